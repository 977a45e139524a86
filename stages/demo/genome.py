"""The demo cohort's genetics: SNP genotypes inherited in families, and a disc-degeneration liability with planted
additive genetic (planted SNPs and a polygenic background), shared-environment and unique parts.

A subject's liability, in units of its standard deviation, is

    L = sum_j beta_j (x_j - 2 p_j)  +  sqrt(polygenic) A  +  sqrt(shared) C  +  sqrt(1 - h2 - shared) E

with x_j the dosage of planted SNP j (allele frequency p_j, beta_j = sqrt(share / (2 p_j (1 - p_j))): each explains
``planted_snp_share`` of the variance), A the polygenic value (the mean of the two parents' values plus a Mendelian
part of variance 1/2: MZ twins share it, DZ twins half of it), C the family's shared environment, E the subject's
own. The planted heritability of L is h2 = planted_snps * planted_snp_share + polygenic. The demo scales L to the
grade scale (``degeneration_sd``) and adds it to every disc's latent grade (stages.demo_cohort).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class GeneticModel:
    snps: tuple[str, ...]
    allele_frequency: np.ndarray
    planted: np.ndarray  # indices of the planted SNPs
    beta: np.ndarray  # per allele, in liability standard deviations, one per planted SNP
    planted_snp_share: float
    polygenic: float
    shared: float

    @property
    def h2(self) -> float:
        return len(self.planted) * self.planted_snp_share + self.polygenic

    @property
    def unique(self) -> float:
        return 1.0 - self.h2 - self.shared


def genetic_model(rng: np.random.Generator, n_snps: int, n_planted: int, planted_snp_share: float, polygenic: float,
                  shared: float) -> GeneticModel:
    """SNP names and allele frequencies (0.05-0.5), planted SNPs (frequencies 0.25-0.5, random signs)."""
    if n_planted * planted_snp_share + polygenic + shared > 1:
        raise ValueError("planted_snps * planted_snp_share + polygenic_share + shared_env_share must be at most 1, got "
                         f"{n_planted * planted_snp_share + polygenic + shared:g}")
    if n_planted > n_snps:
        raise ValueError(f"planted_snps ({n_planted}) exceeds snps ({n_snps})")
    freq = rng.uniform(0.05, 0.5, n_snps)
    planted = np.sort(rng.choice(n_snps, n_planted, replace=False))
    freq[planted] = rng.uniform(0.25, 0.5, n_planted)
    beta = rng.choice([-1.0, 1.0], n_planted) * np.sqrt(planted_snp_share / (2 * freq[planted] * (1 - freq[planted])))
    names = tuple(f"rs{100000 + 7919 * j}" for j in range(n_snps))
    return GeneticModel(names, freq, planted, beta, planted_snp_share, polygenic, shared)


def family_genotypes(rng: np.random.Generator, allele_frequency: np.ndarray, members: list[str]) -> np.ndarray:
    """Dosages (len(members) x SNPs, 0/1/2) of one family's children: two parents drawn at the given allele
    frequencies (independent SNPs), each child one allele from each; ``members`` names each child's kind:
    "MZ" children are copies of the family's first MZ child, every other kind a child of its own."""
    p = np.asarray(allele_frequency, dtype=float)
    parents = (rng.random((2, 2, p.size)) < p).astype(np.int8)      # parent, haplotype, SNP: 1 the counted allele
    children = np.zeros((len(members), p.size), dtype=np.int8)
    first_mz = None
    for i, kind in enumerate(members):
        if kind == "MZ" and first_mz is not None:
            children[i] = children[first_mz]
            continue
        pick = rng.integers(0, 2, (2, p.size))
        children[i] = parents[0, pick[0], np.arange(p.size)] + parents[1, pick[1], np.arange(p.size)]
        if kind == "MZ":
            first_mz = i
    return children


def family_liabilities(model: GeneticModel, rng: np.random.Generator, kinds: list[str],
                       shared: float) -> tuple[np.ndarray, np.ndarray]:
    """Genotypes (members x SNPs) and the part of the standardised liability that is not the subject's own (genes
    and shared environment) of one family's members (``kinds``: MZ, DZ or single), given the family's standard
    normal shared-environment draw. The caller adds ``sqrt(model.unique) * E``."""
    dosages = family_genotypes(rng, model.allele_frequency, kinds)
    parents = rng.normal(size=2)
    mendel = rng.normal(0, np.sqrt(0.5), len(kinds))
    if kinds and kinds[0] == "MZ":
        mendel[:] = mendel[0]
    polygenic = parents.mean() + mendel
    p = model.allele_frequency[model.planted]
    snp_part = (dosages[:, model.planted] - 2 * p) @ model.beta
    return dosages, snp_part + np.sqrt(model.polygenic) * polygenic + np.sqrt(model.shared) * shared


def write_truth(path: Path, model: GeneticModel, sd: float, expected: dict[str, float]) -> None:
    """The planted genetics (JSON): the liability's variance parts, the planted SNPs and the heritability the
    observed disc trait is expected to show."""
    truth = {
        "liability": {"h2": model.h2, "c2": model.shared, "e2": model.unique, "sd_on_grade_scale": sd,
                      "planted_snp_share": model.planted_snp_share, "polygenic_share": model.polygenic},
        "planted_snps": [{"snp": model.snps[j], "allele_frequency": round(float(model.allele_frequency[j]), 4),
                          "beta_per_allele_liability_sd": round(float(b), 4)}
                         for j, b in zip(model.planted, model.beta)],
        "expected": expected,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(truth, indent=2) + "\n")
