"""``lcmkit world ...``: the built-in shapes world (export data, train its teacher and its evaluator)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("world", help="the built-in shapes world: export data, train its teacher/evaluator")
    world_sub = parser.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", required=True)
    _register_export(world_sub)
    _register_train_classifier(world_sub)
    _register_train_teacher(world_sub)


# --- export (owner: data/export.py) -------------------------------------------------------------------------
def _register_export(world_sub) -> None:
    pass


# --- train-classifier (owner: evaluate/classifier.py) -------------------------------------------------------
def _register_train_classifier(world_sub) -> None:
    pass


# --- train-teacher (owner: train/world_teacher.py) ----------------------------------------------------------
def _register_train_teacher(world_sub) -> None:
    pass
