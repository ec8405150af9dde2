"""Assemblies: which teacher layers and which modularized layers make up a model.

A teacher has L layers. A modularized layer of granularity g replaces the g consecutive
layers of one group [j*g, (j+1)*g); groups are aligned, so a module of granularity g can
start only at a multiple of g. An assembly is a tiling of 0..L-1 by tiles: a teacher layer
(size 1) or a module (size g). Its assembled layers are its tiles, their number n its
layer count, and its compression ratio L / n (docs/modular.md).
"""
from __future__ import annotations

import random
from functools import lru_cache
from typing import NamedTuple, Sequence

from ..model.config import ConfigError


class Tile(NamedTuple):
    start: int  # first teacher layer it covers
    size: int   # teacher layers it covers: 1 = the teacher layer itself, g = module g

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def is_module(self) -> bool:
        return self.size > 1

    @property
    def group(self) -> int:
        """Index of the module within its granularity (groups of `size` layers)."""
        return self.start // self.size


Assembly = tuple[Tile, ...]


def describe(assembly: Assembly) -> str:
    """`t0 t1 g2[1] g4[1]`: teacher layers by index, modules as granularity[group]."""
    return " ".join(f"g{t.size}[{t.group}]" if t.is_module else f"t{t.start}"
                    for t in assembly)


def ratio(assembly: Assembly) -> float:
    return assembly[-1].end / len(assembly)


def _choices(position: int, n_layers: int, granularities: Sequence[int]) -> list[int]:
    """Tile sizes that may start at `position`: the teacher layer, and every module whose
    group starts there."""
    return [1] + [g for g in granularities if position % g == 0 and position + g <= n_layers]


@lru_cache(maxsize=64)
def tilings(n_layers: int, granularities: tuple[int, ...]) -> tuple[Assembly, ...]:
    """Every assembly of an n_layers teacher with modules of these granularities."""
    def from_position(i: int) -> list[list[Tile]]:
        if i == n_layers:
            return [[]]
        return [[Tile(i, size), *rest] for size in _choices(i, n_layers, granularities)
                for rest in from_position(i + size)]

    return tuple(tuple(t) for t in from_position(0))


def check(assembly: Assembly, n_layers: int, granularities: tuple[int, ...]) -> None:
    """ValueError unless `assembly` tiles the n_layers with aligned modules of these
    granularities."""
    position = 0
    for tile in assembly:
        if tile.start != position or tile.size not in (1, *granularities) \
                or tile.start % tile.size:
            raise ValueError(f"{describe(assembly)} is not an assembly of the {n_layers}-layer "
                             f"teacher with granularities {list(granularities)}: {tile} does "
                             f"not fit at layer {position}")
        position = tile.end
    if position != n_layers:
        raise ValueError(f"{describe(assembly)} covers {position} of the {n_layers} layers")


def offered_layer_counts(n_layers: int, granularities: tuple[int, ...]) -> list[int]:
    """The layer counts some assembly has, the largest (the teacher) first."""
    return sorted({len(a) for a in tilings(n_layers, granularities)}, reverse=True)


def layers_for_ratio(target: float, n_layers: int, granularities: tuple[int, ...]) -> int:
    """The count of assembled layers whose ratio L / layers is `target` (to 1%), or a
    ConfigError naming the ratios that can be met."""
    for layers in offered_layer_counts(n_layers, granularities):
        if abs(n_layers / layers - target) <= 0.01 * target:
            return layers
    offered = ", ".join(f"{n_layers / d:.3g}x ({d} layers)"
                        for d in offered_layer_counts(n_layers, granularities))
    raise ConfigError(f"--ratio {target:g}: no assembly of the {n_layers}-layer teacher with "
                      f"modules of granularities {list(granularities)} reaches that ratio. Fix: "
                      f"use one of the ratios it offers: {offered}.")


def sample(n_layers: int, granularities: Sequence[int], p: float,
           rng: random.Random) -> Assembly:
    """Multi-grained module replacing: walking up the stack, each position where some module's
    group starts is replaced with probability p by a module of one of those granularities
    (uniformly), which then covers its whole group; otherwise the teacher layer stays."""
    tiles, i = [], 0
    while i < n_layers:
        sizes = _choices(i, n_layers, granularities)[1:]
        size = rng.choice(sizes) if sizes and rng.random() < p else 1
        tiles.append(Tile(i, size))
        i += size
    return tuple(tiles)


def uniform(n_layers: int, granularity: int) -> Assembly:
    """Every group replaced by its module of one granularity (the teacher when 1)."""
    return tuple(Tile(i, granularity) for i in range(0, n_layers, granularity))


def with_layers(n_layers: int, granularities: tuple[int, ...], layers: int) -> list[Assembly]:
    """Every assembly of exactly `layers` assembled layers."""
    found = [a for a in tilings(n_layers, granularities) if len(a) == layers]
    if not found:
        raise ConfigError(f"no assembly of {layers} layers exists; offered layer counts: "
                          f"{offered_layer_counts(n_layers, granularities)}")
    return found


def _sizes(assembly: Assembly) -> list[int]:
    return sorted((t.size for t in assembly), reverse=True)


def _module_starts(assembly: Assembly) -> list[int]:
    return [t.start for t in assembly if t.is_module]


def coarsest_first(n_layers: int, granularities: tuple[int, ...], layers: int) -> Assembly:
    """Fixed rule 1: of the assemblies of `layers` layers, the one with the fewest, coarsest
    modules (its tile sizes, sorted, are the largest lexicographically), which keeps the
    most teacher layers as they are. Ties go to modules nearest the top of the stack, keeping
    the bottom layers, which every later layer reads, exact."""
    return max(with_layers(n_layers, granularities, layers),
               key=lambda a: (_sizes(a), _module_starts(a)))


def finest_first(n_layers: int, granularities: tuple[int, ...], layers: int) -> Assembly:
    """Fixed rule 2: the compression spread over the most, finest modules (sorted tile sizes
    the smallest lexicographically: at ratio g, the uniform assembly of g-modules); ties go
    to modules nearest the top."""
    return min(with_layers(n_layers, granularities, layers),
               key=lambda a: (_sizes(a), [-s for s in _module_starts(a)]))


FIXED_RULES = {"coarsest": coarsest_first, "finest": finest_first}
