// The Prometheus text exposition of GET /metrics, read in the page: the console's traffic
// figures are the very numbers a Prometheus server scrapes, not a second set of counters.

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

function unescape(value) {
  return value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
}

function number(text) {
  if (text === "+Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text);
}

/** name -> [{labels, value}] */
export function parse(text) {
  const out = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = LINE.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, key, value] of (m[2] || "").matchAll(LABEL)) labels[key] = unescape(value);
    if (!out.has(m[1])) out.set(m[1], []);
    out.get(m[1]).push({ labels, value: number(m[3]) });
  }
  return out;
}

/** Sum of a metric's samples whose labels match `where` (a partial label set). */
export function total(samples, name, where = {}) {
  return (samples.get(name) || [])
    .filter((x) => Object.entries(where).every(([k, v]) => x.labels[k] === v))
    .reduce((acc, x) => acc + x.value, 0);
}

/** A histogram summed over its other labels: cumulative buckets [{le, count}], count, sum. */
export function histogram(samples, base, where = {}) {
  const byLe = new Map();
  for (const x of samples.get(`${base}_bucket`) || []) {
    if (!Object.entries(where).every(([k, v]) => x.labels[k] === v)) continue;
    const le = number(x.labels.le);
    byLe.set(le, (byLe.get(le) || 0) + x.value);
  }
  const buckets = [...byLe.entries()].sort((a, b) => a[0] - b[0]).map(([le, count]) => ({ le, count }));
  return { buckets, count: total(samples, `${base}_count`, where), sum: total(samples, `${base}_sum`, where) };
}

/** b - a, bucket by bucket: what happened between two scrapes. */
export function difference(b, a) {
  if (!a) return b;
  const before = new Map(a.buckets.map((x) => [x.le, x.count]));
  return {
    buckets: b.buckets.map((x) => ({ le: x.le, count: x.count - (before.get(x.le) || 0) })),
    count: b.count - a.count,
    sum: b.sum - a.sum,
  };
}

/** Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q. */
export function quantile(q, hist) {
  const { buckets, count } = hist;
  if (!count || !buckets.length) return null;
  const rank = q * count;
  let prevLe = 0;
  let prevCount = 0;
  for (const { le, count: c } of buckets) {
    if (c >= rank) {
      if (le === Infinity) return prevLe; // the highest finite bound is all that is known
      const inBucket = c - prevCount;
      return inBucket > 0 ? prevLe + ((le - prevLe) * (rank - prevCount)) / inBucket : le;
    }
    prevLe = le;
    prevCount = c;
  }
  return prevLe;
}

/** Cumulative buckets -> per-bucket counts with readable labels. */
export function perBucket(hist, label) {
  let prev = 0;
  return hist.buckets.map(({ le, count }) => {
    const row = { label: le === Infinity ? "more" : label(le), count: count - prev };
    prev = count;
    return row;
  });
}
