"""Evolutionary search over subnet configs under a cost budget (after OFA's evolution finder).

Each generation keeps the best `parent_ratio` of the population as parents and fills the rest with
children: a `mutation_ratio` share by mutating a random parent (each gene resampled with probability
`mutate_prob`), the others by uniform crossover of two random parents. Every member meets the budget
and every child is a subnet not drawn before (children that are not are drawn again), so each
generation measures new subnets. Genes are the per-block kernel size and expand ratio and the
per-stage depth; entries of blocks a depth skips are set to the smallest choice, so that configs that
compute the same subnet are one config (and one cache entry). Seeded: the same inputs give the same
search, step for step.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

from engine.supernet import arch
from engine.supernet.arch import SupernetSpec

MAX_TRIES = 1000


@dataclass
class SearchSpace:
    spec: SupernetSpec
    n_stages: int

    def canonical(self, cfg: dict) -> dict:
        """`cfg` with the entries of skipped blocks set to the smallest choices."""
        out = {k: list(v) for k, v in cfg.items()}
        depth = self.spec.max_depth
        for s, d in enumerate(out["d"]):
            for b in range(s * depth + d, (s + 1) * depth):
                out["ks"][b], out["e"][b] = self.spec.kernel_sizes[0], self.spec.expand_ratios[0]
        return out

    def random(self, rng: random.Random) -> dict:
        n = self.n_stages * self.spec.max_depth
        return self.canonical({"ks": [rng.choice(self.spec.kernel_sizes) for _ in range(n)],
                               "e": [rng.choice(self.spec.expand_ratios) for _ in range(n)],
                               "d": [rng.choice(self.spec.depths) for _ in range(self.n_stages)]})

    def mutate(self, cfg: dict, prob: float, rng: random.Random) -> dict:
        choices = {"ks": self.spec.kernel_sizes, "e": self.spec.expand_ratios, "d": self.spec.depths}
        return self.canonical({k: [rng.choice(choices[k]) if rng.random() < prob else v for v in values]
                               for k, values in cfg.items()})

    def crossover(self, a: dict, b: dict, rng: random.Random) -> dict:
        return self.canonical({k: [x if rng.random() < 0.5 else y for x, y in zip(a[k], b[k])] for k in a})

    def smallest(self) -> dict:
        return self.canonical(arch.min_config(self.spec, self.n_stages))

    def largest(self) -> dict:
        return self.canonical(arch.max_config(self.spec, self.n_stages))


@dataclass
class SearchResult:
    best: dict
    fitness: float
    cost: float
    history: list[dict] = field(default_factory=list)     # per generation: best fitness and its cost
    members: list[dict] = field(default_factory=list)     # every config the search scored


def sample_within(draw: Callable[[], dict], cost: Callable[[dict], float], budget: float,
                  taken: set | None = None) -> dict:
    """A config from `draw()` whose cost is within `budget` and, when it can be, not in `taken` (which it
    joins); ValueError when none of MAX_TRIES draws is within the budget."""
    fallback = None
    for _ in range(MAX_TRIES):
        cfg = draw()
        if cost(cfg) <= budget:
            if taken is None or _key(cfg) not in taken:
                if taken is not None:
                    taken.add(_key(cfg))
                return cfg
            fallback = fallback or cfg
    if fallback is not None:                    # the budget admits no new config: repeat a known one
        return fallback
    raise ValueError(f"no subnet within the budget {budget:g} was found in {MAX_TRIES} draws")


def evolve(space: SearchSpace, fitness: Callable[[dict], float], cost: Callable[[dict], float], budget: float,
           population: int = 20, generations: int = 10, parent_ratio: float = 0.25, mutation_ratio: float = 0.5,
           mutate_prob: float = 0.1, seed: int = 0,
           on_generation: Callable[[int, SearchResult], None] | None = None) -> SearchResult:
    """Maximise `fitness` over configs whose `cost` <= `budget`."""
    if population < 2 or generations < 1:
        raise ValueError(f"population {population} must be >= 2 and generations {generations} >= 1")
    rng = random.Random(seed)
    taken: set = set()                           # every config drawn so far: children are new subnets
    members = [sample_within(lambda: space.random(rng), cost, budget, taken) for _ in range(population)]
    seen: dict[tuple, dict] = {}
    n_parents = max(1, math.ceil(population * parent_ratio))
    n_mutants = int(round((population - n_parents) * mutation_ratio))
    result = SearchResult(best={}, fitness=-math.inf, cost=math.inf)
    for generation in range(generations):
        scored = sorted(((fitness(m), i, m) for i, m in enumerate(members)), key=lambda t: (-t[0], t[1]))
        for f, _, m in scored:
            seen.setdefault(_key(m), m)
        top_f, _, top = scored[0]
        if top_f > result.fitness:
            result.best, result.fitness, result.cost = top, top_f, cost(top)
        result.history.append({"generation": generation, "best_fitness": result.fitness, "best_cost": result.cost})
        if on_generation is not None:
            on_generation(generation, result)
        if generation == generations - 1:
            break
        parents = [m for _, _, m in scored[:n_parents]]
        mutants = [sample_within(lambda: space.mutate(rng.choice(parents), mutate_prob, rng), cost, budget, taken)
                   for _ in range(n_mutants)]
        crossed = [sample_within(lambda: space.crossover(rng.choice(parents), rng.choice(parents), rng), cost,
                                 budget, taken) for _ in range(population - n_parents - n_mutants)]
        members = parents + mutants + crossed
    result.members = list(seen.values())
    return result


def _key(cfg: dict) -> tuple:
    return tuple(tuple(cfg[k]) for k in ("ks", "e", "d"))
