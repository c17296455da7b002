"""The static schedule of a fractal block: which column has a conv unit where, and what each join takes.

The paper's expansion rule f_1 = conv, f_{C+1} = join(f_C ∘ f_C, conv) unrolls into a fixed grid
(spec §1): along the deepest column there are 2^(C-1) positions; column k (1 = shallowest) has a unit
at every position that is a multiple of 2^(C-k); after every even position one collapsed join takes
every column that has a unit there. Everything here is plain Python, so shapes and loops are static
at trace time and the schedule can be printed, compared and tested on its own.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Join:
    """One collapsed join: the element-wise mean of the named columns' outputs after `position`."""

    position: int
    columns: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class BlockSchedule:
    """The unit grid and joins of one fractal block with `num_columns` columns."""

    num_columns: int

    def __post_init__(self):
        if not isinstance(self.num_columns, int) or self.num_columns < 1:
            raise ValueError(
                f"num_columns must be an integer >= 1, got {self.num_columns!r}; "
                "C=1 is a plain conv chain, the paper uses C=3 or 4.")

    @property
    def depth(self) -> int:
        """Conv units along the deepest column: 2^(C-1)."""
        return 2 ** (self.num_columns - 1)

    def columns_at(self, position: int) -> tuple[int, ...]:
        """Columns (ascending) that have a conv unit at 1-based `position`."""
        c = self.num_columns
        return tuple(k for k in range(1, c + 1) if position % 2 ** (c - k) == 0)

    @property
    def units(self) -> tuple[tuple[int, int], ...]:
        """Every conv unit as (column, position), in execution order."""
        return tuple((k, p) for p in range(1, self.depth + 1) for k in reversed(self.columns_at(p)))

    @property
    def joins(self) -> tuple[Join, ...]:
        """The collapsed joins in execution order; the last one always takes every column."""
        return tuple(Join(p, self.columns_at(p)) for p in range(2, self.depth + 1, 2))

    def column_positions(self, column: int) -> tuple[int, ...]:
        """Positions of the units on `column`'s path: 2^(column-1) of them."""
        self.check_column(column)
        step = 2 ** (self.num_columns - column)
        return tuple(range(step, self.depth + 1, step))

    def check_column(self, column: int) -> None:
        if not 1 <= column <= self.num_columns:
            raise ValueError(
                f"column must be in 1..{self.num_columns} (1 = shallowest, "
                f"{self.num_columns} = deepest), got {column!r}.")

    def first_unit(self, column: int) -> int:
        """Position of `column`'s first unit, the one that reads the block input."""
        return self.column_positions(column)[0]

    def describe(self) -> str:
        """A readable listing, e.g. 'pos1 {3}; pos2 {2,3} -> J{2,3}; ...'."""
        parts = []
        for p in range(1, self.depth + 1):
            cols = self.columns_at(p)
            text = f"pos{p} {{{','.join(map(str, reversed(cols)))}}}"
            if p % 2 == 0:
                text += f" -> J{{{','.join(map(str, cols))}}}"
            parts.append(text)
        return "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class NetworkSchedule:
    """The schedules of all B blocks; blocks may have different column counts."""

    blocks: tuple[BlockSchedule, ...]

    @classmethod
    def create(cls, num_columns: int | Sequence[int], num_blocks: int) -> "NetworkSchedule":
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}.")
        if isinstance(num_columns, int):
            num_columns = (num_columns,) * num_blocks
        num_columns = tuple(num_columns)
        if len(num_columns) != num_blocks:
            raise ValueError(
                f"num_columns has {len(num_columns)} entries but there are {num_blocks} blocks; "
                "give one int for all blocks or one per block.")
        return cls(tuple(BlockSchedule(c) for c in num_columns))

    @property
    def max_columns(self) -> int:
        return max(b.num_columns for b in self.blocks)

    def block_column(self, block: int, column: int) -> int:
        """The column of block `block` that network column `column` runs through.

        Network columns are numbered 1..max C; a block with fewer columns runs its deepest one,
        so column c of a network with per-block column counts is still one plain chain.
        """
        if not 1 <= column <= self.max_columns:
            raise ValueError(
                f"column must be in 1..{self.max_columns} (1 = shallowest, "
                f"{self.max_columns} = deepest), got {column!r}.")
        return min(column, self.blocks[block].num_columns)

    def column_depth(self, column: int) -> int:
        """Conv layers on network column `column` (the blocks only, no stem)."""
        return sum(len(b.column_positions(self.block_column(i, column)))
                   for i, b in enumerate(self.blocks))

    @property
    def depth(self) -> int:
        """Conv layers on the deepest path, B·2^(C-1) for equal blocks."""
        return sum(b.depth for b in self.blocks)
