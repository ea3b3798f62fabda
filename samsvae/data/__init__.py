"""AnnData -> ScreenData (CSR counts, CSR dosage, library sizes), splits, minibatches, simulator."""
from .backed import BackedCSR
from .loader import Batch, MinibatchLoader, check_indices, csr_to_torch, make_batch
from .perturbations import (CONTROL_CANDIDATES, PerturbationDesign, additive_gram,
                            additive_shifts, design_from_dosage, log_depth_shifts, parse_labels,
                            perturbation_cell_counts)
from .screen import ScreenData, gene_log1p_stats, library_sizes, load_screen, with_batches
from .simulate import simulate_screen, synth_batch, write_simulated_screen
from .splits import make_split, ood_candidates, split_indices, validate_split, write_split

__all__ = [
    "BackedCSR", "Batch", "additive_gram", "additive_shifts", "CONTROL_CANDIDATES",
    "MinibatchLoader", "PerturbationDesign",
    "ScreenData", "check_indices", "csr_to_torch", "design_from_dosage", "gene_log1p_stats",
    "library_sizes", "load_screen", "log_depth_shifts", "make_batch", "make_split", "ood_candidates", "parse_labels",
    "perturbation_cell_counts", "simulate_screen", "split_indices", "synth_batch",
    "validate_split", "with_batches", "write_simulated_screen", "write_split",
]
