"""Helpers shared by the test files; pytest loads this file first, and the tests import the
helpers by name (`from conftest import rng, TINY`)."""


import os

import numpy as np

import runs
import train


HERE = os.path.dirname(os.path.abspath(__file__))  # the project folder: command lines run here


def rng(seed=0):
    return np.random.default_rng(seed)


# settings of a tiny training run: train.run(experiment, **TINY)
TINY = dict(T=5, n_train=64, n_test=32, n_probe=4, steps=6, checkpoint_every=2, log_every=2)


def argv_of(settings):
    """Command-line options of a settings dict: ["--key", "value", ...]."""
    return [a for k, v in settings.items() for a in (f"--{k}", str(v))]


def flat(tree):
    return runs.flatten(tree)


def folder_bytes(folder):
    """{relative path: bytes} of every file under folder."""
    return {os.path.relpath(os.path.join(root, f), folder): open(os.path.join(root, f), "rb").read()
            for root, _, files in os.walk(folder) for f in files}


def finished_run(runs_dir):
    """A finished tiny run in runs_dir/block and the bytes of every file under runs_dir."""
    train.run("block", runs_dir=str(runs_dir), quiet=True, **TINY)
    return folder_bytes(runs_dir)
