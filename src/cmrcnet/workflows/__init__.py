"""Workflows: what composes the pipeline's steps (training, inference, evaluation) into one call.

`train.train_run` fits a model (training) and builds its reference bank (inference) through the run folder.
"""
