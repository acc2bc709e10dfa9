"""Which rows of each global batch a process reads, as a Grain transformation.

A global batch contains all generation rows first, then all understanding
rows. Each of the `process_count` processes reads one contiguous block of
each, so the local batches of processes 0, 1, ... concatenated per field
form the batch that a single process reads with the same config.
"""

from typing import Sequence

import grain


def global_batch_rows(
    gen_rows: int, und_rows: int, process_index: int, process_count: int
) -> list[int]:
    """Return the rows of the global batch that one process reads, in local batch order.

    `gen_rows` and `und_rows` count the rows of one process.
    """
    global_gen = gen_rows * process_count
    gen = range(process_index * gen_rows, (process_index + 1) * gen_rows)
    und = range(global_gen + process_index * und_rows, global_gen + (process_index + 1) * und_rows)
    return list(gen) + list(und)


class ProcessRows(grain.MapDataset):
    """One process's rows of each global batch of a stream, as a stream of local rows.

    Element `j` is row `j % len(rows)` of local batch `j // len(rows)`, which is
    parent element `batch * global_batch_size + rows[row]`. Only these parent
    elements are ever read, so each process decodes its own rows alone.
    """

    def __init__(self, parent: grain.MapDataset, rows: Sequence[int], global_batch_size: int):
        super().__init__(parent)
        self._rows = tuple(rows)
        self._global_batch_size = global_batch_size

    def __len__(self) -> int:
        return len(self._parent) // self._global_batch_size * len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, len(self._rows))
        return self._parent[batch * self._global_batch_size + self._rows[row]]

    def __str__(self) -> str:
        return f"ProcessRows(rows={list(self._rows)}, global_batch_size={self._global_batch_size})"
