"""Read a local `torch.save` file (a Dassl `model.pth.tar-N`) without executing anything from it.

Dassl's `save_model` stores the scheduler's `state_dict()`. With `WARMUP_EPOCH: 1`, in every
reference config, the scheduler is Dassl's warmup wrapper, and torch's `state_dict()` keeps all
of its attributes: the wrapped `CosineAnnealingLR` *object*, which holds the SGD *object*, whose
momentum `state` is a `collections.defaultdict`. `torch.load(weights_only=True)` rightly refuses
those globals, so the files the trainers write could not be read.

Here the pickle runs through torch's own zip reader (`torch.load` with our `pickle_module`), but
every opcode that could run code is ours:
- `find_class` (GLOBAL, STACK_GLOBAL) returns only what `ALLOWED` lists: inert placeholders for the
  optimizer and scheduler classes, a plain `dict` subclass for the `collections` containers, and
  two checked wrappers that rebuild tensors from the archive's storages. Any other global is
  refused with an error that names it, before anything is imported or called.
- REDUCE, NEWOBJ and BUILD call only those objects, and BUILD only our placeholders' own
  `__setstate__` (which stores the state and interprets nothing). Items are added only to plain
  dicts, lists and sets (never through a tensor's `__setitem__`). INST, OBJ, NEWOBJ_EX and the
  extension-registry opcodes are refused. So no constructor, `__setstate__` or `__reduce__` of any
  class from the file ever runs: the SGD and the scheduler come back as inert records.
This needs the pure-Python `pickle._Unpickler`: the C unpickler's dispatch cannot be overridden.

Before that, the archive itself is checked with `zipfile` (nothing is extracted): member names must
be relative, without `..`, under one folder; members must be stored uncompressed as torch writes
them; a TorchScript archive (which `torch.load` would hand to `torch.jit.load`) is refused.
"""

from __future__ import annotations

import pickle
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import torch
from torch import Tensor

from service.errors import InvalidContent, MalformedCheckpoint

MAX_ARCHIVE_BYTES = 16 * 2**30  # declared size of all members; a ViT-L whole model is ~1 GiB
MAX_MEMBERS = 100_000


class Inert:
    """What an allow-listed class from the pickle becomes: its arguments and state, nothing run."""

    global_name: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        obj = object.__new__(cls)
        obj.__dict__["args"] = args
        obj.__dict__["state"] = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<inert {self.global_name}>"


class InertDict(dict[Any, Any]):
    """`collections.OrderedDict` / `defaultdict` as a plain dict: the arguments (a default factory)
    are ignored; the items arrive through SETITEMS; pickled attributes (`_metadata`) are dropped."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        pass


def _placeholder(name: str) -> type[Inert]:
    return type(name.rsplit(".", 1)[-1], (Inert,), {"global_name": name})


def _rebuild_tensor(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    hooks: Any = None,
    metadata: Any = None,
) -> Tensor:
    """`torch._utils._rebuild_tensor_v2` with its arguments checked: a storage read from the
    archive, integer geometry, no backward hooks and no extra Python state on the tensor."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("a tensor is rebuilt from something that is not a storage")
    ints = (offset, *tuple(size), *tuple(stride))
    if not all(type(v) is int for v in ints) or len(size) != len(stride):
        raise pickle.UnpicklingError("a tensor has a non-integer offset, size or stride")
    if hooks or metadata:
        raise pickle.UnpicklingError("a tensor carries backward hooks or Python state")
    return torch._utils._rebuild_tensor_v2(
        storage, offset, tuple(size), tuple(stride), False, OrderedDict()
    )


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None) -> Tensor:
    """An `nn.Parameter` (the optimizer's own references) comes back as its plain tensor."""
    if not isinstance(data, Tensor) or hooks:
        raise pickle.UnpicklingError("a parameter wraps something other than a plain tensor")
    return data


# Everything a Dassl checkpoint pickles besides plain data (checked on files written by torch
# 1.x and 2.x): the optimizers and schedulers Dassl builds from torch.optim, the containers of
# their state, and tensors. `builtins.dict` is only ever the defaultdict's factory argument.
_PLACEHOLDERS = (
    "torch.optim.sgd.SGD",
    "torch.optim.adam.Adam",
    "torch.optim.adamw.AdamW",
    "torch.optim.rmsprop.RMSprop",
    "torch.optim.lr_scheduler.CosineAnnealingLR",
    "torch.optim.lr_scheduler.StepLR",
    "torch.optim.lr_scheduler.MultiStepLR",
    "builtins.dict",
)
ALLOWED: dict[str, Any] = {name: _placeholder(name) for name in _PLACEHOLDERS} | {
    "collections.OrderedDict": InertDict,
    "collections.defaultdict": InertDict,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
}
_CALLABLE = frozenset(id(v) for v in ALLOWED.values())
# protocol-2 pickles name builtins by their Python 2 module
_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global that is not on the allow-list."""


class RestrictedUnpickler(pickle._Unpickler):
    """A pickle reader whose only callables are those in `ALLOWED` (see the module docstring)."""

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    # the pure-Python unpickler's working state (not in typeshed's stubs)
    stack: list[Any]
    append: Callable[[Any], None]
    pop_mark: Callable[[], list[Any]]

    def find_class(self, module: str, name: str) -> Any:
        full = f"{_MODULE_ALIASES.get(module, module)}.{name}"
        if full not in ALLOWED:
            raise RefusedGlobal(full)
        return ALLOWED[full]

    def _refuse(self, what: str) -> None:
        raise pickle.UnpicklingError(f"the pickle uses {what}, which a checkpoint never needs")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in _CALLABLE or not isinstance(args, tuple):
            self._refuse(f"a call to {type(func).__name__}")
        self.stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if id(cls) not in _CALLABLE or not isinstance(cls, type) or not isinstance(args, tuple):
            self._refuse(f"NEWOBJ of {cls!r}")
        self.append(cls.__new__(cls, *args))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is InertDict or (isinstance(inst, Inert) and id(type(inst)) in _CALLABLE):
            inst.__setstate__(state)  # our own: stores or drops the state
        else:
            self._refuse(f"BUILD on a {type(inst).__name__}")

    def _container(self, kind: type) -> Any:
        # items go only into plain containers: never a tensor's or a storage's __setitem__
        target = self.stack[-1]
        if not isinstance(target, kind):
            self._refuse(f"items added to a {type(target).__name__}")
        return target

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._container(dict)[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._container(dict)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_append(self) -> None:
        value = self.stack.pop()
        self._container(list).append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._container(list).extend(items)

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._container(set).update(items)

    def load_refused(self) -> None:
        self._refuse("an opcode that instantiates or looks up classes by other means")


RestrictedUnpickler.dispatch |= {
    pickle.REDUCE[0]: RestrictedUnpickler.load_reduce,
    pickle.NEWOBJ[0]: RestrictedUnpickler.load_newobj,
    pickle.BUILD[0]: RestrictedUnpickler.load_build,
    pickle.SETITEM[0]: RestrictedUnpickler.load_setitem,
    pickle.SETITEMS[0]: RestrictedUnpickler.load_setitems,
    pickle.APPEND[0]: RestrictedUnpickler.load_append,
    pickle.APPENDS[0]: RestrictedUnpickler.load_appends,
    pickle.ADDITEMS[0]: RestrictedUnpickler.load_additems,
    **{
        op[0]: RestrictedUnpickler.load_refused
        for op in (pickle.INST, pickle.OBJ, pickle.NEWOBJ_EX, pickle.EXT1, pickle.EXT2, pickle.EXT4)
    },
}

# What torch.load needs of a pickle module on the zip path: its name and its Unpickler.
PICKLE_MODULE = types.SimpleNamespace(__name__=__name__, Unpickler=RestrictedUnpickler)


def check_archive(path: Path) -> None:
    """Refuse anything but a torch zip archive with plain, contained member names."""
    if not path.is_file():
        raise InvalidContent(f"{path} does not exist or is not a file")
    with path.open("rb") as f:
        magic = f.read(4)
    # torch.load decides by the first bytes, zipfile by the end: both must say "zip"
    if magic != b"PK\x03\x04" or not zipfile.is_zipfile(path):
        raise MalformedCheckpoint(
            f"{path} is not a torch zip archive (torch >= 1.6 writes one); older pickle-format "
            "files are not read: re-save it with a current torch in an environment you trust"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise MalformedCheckpoint(f"{path} is not a readable zip archive: {exc}") from exc
    if len(members) > MAX_MEMBERS:
        raise MalformedCheckpoint(f"{path} has {len(members)} members; at most {MAX_MEMBERS}")
    tops = set()
    for m in members:
        parts = PurePosixPath(m.filename).parts
        if (
            not parts
            or m.filename.startswith("/")
            or "\\" in m.filename
            or "\x00" in m.filename
            or ".." in parts
            or ":" in parts[0]
        ):
            raise MalformedCheckpoint(f"{path} has an unsafe member name {m.filename!r}")
        if m.compress_type != zipfile.ZIP_STORED:
            raise MalformedCheckpoint(
                f"{path}: member {m.filename!r} is compressed; torch stores its members as is"
            )
        tops.add(parts[0])
    if len(tops) != 1:
        raise MalformedCheckpoint(f"{path}: members under {len(tops)} folders; torch writes one")
    names = {PurePosixPath(m.filename).relative_to(next(iter(tops))).as_posix() for m in members}
    if "data.pkl" not in names:
        raise MalformedCheckpoint(f"{path} has no data.pkl: it is not a torch.save archive")
    if "constants.pkl" in names or any(n.startswith("code/") for n in names):
        raise MalformedCheckpoint(f"{path} is a TorchScript archive, not a checkpoint")
    if sum(m.file_size for m in members) > MAX_ARCHIVE_BYTES:
        raise MalformedCheckpoint(f"{path} declares more than {MAX_ARCHIVE_BYTES} bytes")


def read_torch_file(path: str | Path) -> Any:
    """The object a local `torch.save` file holds, read as described in the module docstring."""
    path = Path(path)
    check_archive(path)
    try:
        # weights_only=False only because a custom pickle_module is given; it is the restricted one
        return torch.load(path, map_location="cpu", pickle_module=PICKLE_MODULE, weights_only=False)
    except RefusedGlobal as exc:
        raise MalformedCheckpoint(
            f"{path} refers to the global {exc}, which is not read: a checkpoint may hold tensors, "
            "the torch optimizer and scheduler objects Dassl saves, and collections containers"
        ) from exc
    except Exception as exc:  # torch and pickle raise many types for corrupt input
        raise MalformedCheckpoint(f"cannot read {path}: {exc}") from exc
