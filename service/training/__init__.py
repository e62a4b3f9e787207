"""Training: data, recipes, trainer, evaluation, jobs and the offline proving ground."""
