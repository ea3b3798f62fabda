"""The backend registry (samsvae.ops.backends): name checks, the precedence explicit
``backend=`` > ``use_backend()`` > ``SAMSVAE_BACKEND`` > auto, composite ops, tolerant loading."""
import threading

import pytest
import torch
from helpers import random_inputs

from samsvae import ops
from samsvae.ops import backends, use_backend


def test_dispatcher_rules(monkeypatch):
    x, logits, ll, lt = random_inputs()
    with pytest.raises(ValueError, match="unknown backend"):
        ops.nb_log_prob(x, logits, ll, lt, backend="cuda-magic")
    if "triton" not in backends._REGISTRY.get("nb_log_prob", {}) or not torch.cuda.is_available():
        with pytest.raises(ops.BackendUnavailableError):
            ops.nb_log_prob(x, logits, ll, lt, backend="triton")
    monkeypatch.setenv("SAMSVAE_BACKEND", "reference")
    assert backends.resolve("nb_log_prob", "auto", "cpu")[0] == "reference"
    monkeypatch.setenv("SAMSVAE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="SAMSVAE_BACKEND"):
        backends.resolve("nb_log_prob", "auto", "cpu")
    assert "reference" in ops.available_backends()


def test_use_backend_sits_between_the_argument_and_the_environment(monkeypatch):
    monkeypatch.setenv("SAMSVAE_BACKEND", "nonsense")    # would raise if it were consulted
    with use_backend("reference"):
        assert backends.resolve("nb_log_prob", "auto", "cpu")[0] == "reference"
        assert backends.resolve("nb_log_prob", None, "cpu")[0] == "reference"
        if "cpp" in ops.available_backends("nb_log_prob"):
            assert backends.resolve("nb_log_prob", "cpp", "cpu")[0] == "cpp"   # argument wins
    monkeypatch.setenv("SAMSVAE_BACKEND", "reference")
    with use_backend("auto"):                              # "auto" in the block beats the env
        assert backends.resolve("nb_log_prob", "auto", "cpu")[0] == \
            backends._AUTO_ORDER["cpu"][0 if "cpp" in ops.available_backends() else 1]
    assert backends.resolve("nb_log_prob", "auto", "cpu")[0] == "reference"


def test_use_backend_nests_restores_and_checks_the_name():
    before = backends.resolve("nb_log_prob", "auto", "cpu")[0]
    with use_backend("reference"):
        with use_backend("auto"):
            assert backends.resolve("nb_log_prob", "auto", "cpu")[0] == before
        assert backends.resolve("nb_log_prob", "auto", "cpu")[0] == "reference"
    assert backends.resolve("nb_log_prob", "auto", "cpu")[0] == before
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic' \\(use_backend\\)"):
        with use_backend("cuda-magic"):
            pass
    with pytest.raises(RuntimeError):
        with use_backend("reference"):
            raise RuntimeError("the block failed")
    assert backends.resolve("nb_log_prob", "auto", "cpu")[0] == before


def test_use_backend_is_per_thread():
    seen = {}

    def other():
        seen["other"] = backends.resolve("nb_log_prob", "auto", "cpu")[0]

    with use_backend("reference"):
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert backends.resolve("nb_log_prob", "auto", "cpu")[0] == "reference"
    assert seen["other"] == backends.resolve("nb_log_prob", "auto", "cpu")[0]


def test_use_backend_reaches_the_ops_and_an_unavailable_one_raises():
    x, logits, ll, lt = random_inputs()
    with use_backend("reference"):
        torch.testing.assert_close(ops.nb_log_prob(x, logits, ll, lt),
                                   ops.nb_log_prob_reference(x, logits, ll, lt))
    if not torch.cuda.is_available():
        with use_backend("triton"), pytest.raises(ops.BackendUnavailableError):
            ops.nb_log_prob(x, logits, ll, lt)


def test_composite_op_follows_its_kernel_op_in_the_report():
    report = dict(line.split(": ", 1) for line in ops.backend_report().splitlines())
    assert report["nb_log_prob_linear"].startswith(report["nb_log_prob"])
    assert report["nb_log_prob_linear"].endswith("(composite: runs the nb_log_prob kernel of that backend inside)")
    assert "nb_log_prob_linear" not in backends._REGISTRY
    assert ops.available_backends("nb_log_prob_linear") == ops.available_backends("nb_log_prob")
    with pytest.raises(ValueError, match="follows"):
        backends.register("nb_log_prob_linear", "reference", lambda *a: None)


def test_a_broken_optional_tier_is_recorded_not_raised(monkeypatch):
    monkeypatch.setattr(backends, "LOAD_ERRORS", {})
    backends.load_tier("samsvae.ops.no_such_tier")
    assert "ModuleNotFoundError" in backends.LOAD_ERRORS["samsvae.ops.no_such_tier"]
    backends.load_tier("samsvae.ops.also_missing", needs=lambda: False)   # not even tried
    assert "samsvae.ops.also_missing" not in backends.LOAD_ERRORS


def test_lazy_implementation_is_imported_on_first_use(monkeypatch):
    monkeypatch.setitem(backends._REGISTRY, "lazy_op", {})
    backends.register("lazy_op", "reference", "math:fsum")
    name, fn = backends.resolve("lazy_op", "reference", "cpu")
    assert name == "reference" and fn([0.5, 0.25]) == 0.75
