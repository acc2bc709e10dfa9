"""Print the golden table of train-state shardings on a (data 2, fsdp 2, tensor 2) mesh.

    python tests/golden/sharding_table.py > tests/golden/shardings_2x2x2.json

The table contains the PartitionSpec of every parameter and codebook array of the
tiny test config (`tests/conftest.py`), as the logical-axis rules produce them.
`tests/test_sharding.py` checks the rules and a trained state against it.
Regenerate it only after changing a rule or a parameter on purpose, and
review the diff: every changed line is a parameter that moves between devices.
"""

import json
import os
import sys

from jax.sharding import AbstractMesh

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)
sys.path.insert(0, os.path.dirname(TESTS))

from conftest import TINY_VOCAB, tiny_config  # noqa: E402
from rf_jax import configs  # noqa: E402
from rf_jax import partitioning  # noqa: E402
from rf_jax import trainer as trainer_lib  # noqa: E402

MESH_SHAPE = (2, 2, 2)
REGENERATE = "python tests/golden/sharding_table.py > tests/golden/shardings_2x2x2.json"


def state_shardings(config=None):
    """Return the shardings of the tiny config's train state on an abstract (2, 2, 2) mesh.

    The mesh is abstract, so no devices are needed.
    """
    config = tiny_config() if config is None else config
    mesh = AbstractMesh(MESH_SHAPE, partitioning.MESH_AXES)
    model_config = configs.model_config(config, TINY_VOCAB)
    trainer = trainer_lib.Trainer(config, model_config, mesh, total_steps=10)
    return trainer.abstract_state()[1]


def sharding_table():
    """Return the golden table: parameter and codebook specs, and the command that rewrites it."""
    shardings = state_shardings()
    return dict(
        regenerate=REGENERATE,
        mesh=dict(zip(partitioning.MESH_AXES, MESH_SHAPE)),
        params=partitioning.spec_table(shardings.params),
        codebook=partitioning.spec_table(shardings.codebook),
    )


def format_table(table):
    """Return the table as JSON text with one line per array, so diffs show one array per line."""
    sections = []
    for key, value in table.items():
        if isinstance(value, dict) and key != "mesh":
            rows = [f"    {json.dumps(path)}: {json.dumps(spec)}" for path, spec in value.items()]
            sections.append(f"  {json.dumps(key)}: {{\n" + ",\n".join(rows) + "\n  }")
        else:
            sections.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(sections) + "\n}\n"


if __name__ == "__main__":
    sys.stdout.write(format_table(sharding_table()))
