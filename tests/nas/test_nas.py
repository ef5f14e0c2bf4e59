"""NAS: sliced sub-networks equal standalone models, the latency model, and tiny searches end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from lmforge.cli import main
from lmforge.data.builtin import load_builtin
from lmforge.data.readers import write_jsonl
from lmforge.data.tokenizer import load_tokenizer
from lmforge.models.bert import Bert, BertConfig
from lmforge.nas.latency import FEATURES, LatencyModel, features, measure_latency, relative_errors
from lmforge.nas.search import pareto_front
from lmforge.nas.space import Arch, SearchSpace, base_config, count_params
from lmforge.nas.supernet import SandwichTask, Supernet
from lmforge.tasks.classification import ClassificationTask

SPACE = SearchSpace(n_layers=[1, 2, 3], d_model=[16, 32, 48], n_heads=[1, 2, 4], d_ff=[24, 64], baselines=[])
BASE = BertConfig(vocab_size=50, max_seq_len=16, dropout=0.0, attn_dropout=0.0, pooler=False, mlm_head=False)


def _classifier(arch: Arch) -> torch.nn.Module:
    from lmforge.models.heads import EncoderWithHead, SequenceClassifier

    return EncoderWithHead(Bert(arch.config(BASE)), SequenceClassifier(arch.d_model, 3, dropout=0.0, pooling="pooler"))


def _by_hand(full: dict[str, torch.Tensor], arch: Arch, d_full: int) -> dict[str, torch.Tensor]:
    """The sub-network's weights sliced independently of lmforge.nas: leading rows / columns, the fused
    query/key/value matrix block by block, the first n_layers layers."""
    d, f = arch.d_model, arch.d_ff
    out = {}
    for name, t in full.items():
        if name.startswith("encoder.layers.") and int(name.split(".")[2]) >= arch.n_layers:
            continue
        if "attn.qkv" in name:
            rows = torch.cat([torch.arange(i * d_full, i * d_full + d) for i in range(3)])
            out[name] = t[rows][:, :d] if t.dim() == 2 else t[rows]
        elif "ffn" in name and name.endswith("up.weight"):
            out[name] = t[:f, :d]
        elif "ffn" in name and name.endswith("up.bias"):
            out[name] = t[:f]
        elif "ffn" in name and name.endswith("down.weight"):
            out[name] = t[:d, :f]
        elif name.endswith(("word.weight", "position.weight", "token_type.weight", "head.out.weight")):
            out[name] = t[:, :d]  # every row (token, position, class), the leading columns
        elif name == "head.out.bias":
            out[name] = t
        elif t.dim() == 2:
            out[name] = t[:d, :d]
        else:
            out[name] = t[:d]
    return {k: v.clone() for k, v in out.items()}


@pytest.mark.parametrize("arch", [Arch(1, 16, 1, 24), Arch(2, 32, 4, 64), Arch(3, 48, 2, 24), Arch(3, 48, 4, 64)])
def test_sliced_subnetwork_equals_a_standalone_model(arch: Arch) -> None:
    torch.manual_seed(0)
    supernet = Supernet(_classifier, SPACE).eval()
    standalone = _classifier(arch).eval()
    names = {k for k, _ in standalone.named_parameters()}
    full = {k: v.detach() for k, v in supernet.full.named_parameters()}
    by_hand = _by_hand(full, arch, SPACE.largest.d_model)
    assert set(by_hand) == names  # the hand slicing covers exactly the standalone model's parameters
    standalone.load_state_dict(by_hand, strict=False)
    ids = torch.randint(0, 50, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    expected = standalone(ids, attention_mask=mask)
    torch.testing.assert_close(supernet.bind(arch)(ids, attention_mask=mask), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(supernet.extract(arch).eval()(ids, attention_mask=mask), expected, rtol=1e-5, atol=1e-6)


def test_the_largest_subnetwork_is_the_supernet_and_gradients_reach_only_its_slices() -> None:
    torch.manual_seed(0)
    supernet = Supernet(_classifier, SPACE)
    ids = torch.randint(0, 50, (2, 10))
    torch.testing.assert_close(supernet.bind(SPACE.largest)(ids), supernet.full(ids))
    small = Arch(1, 16, 2, 24)
    supernet.bind(small)(ids).sum().backward()
    qkv = supernet.full.encoder.layers[0].attn.qkv.weight.grad  # (3 x 48, 48)
    used = torch.zeros_like(qkv, dtype=torch.bool)
    for block in range(3):
        used[block * 48 : block * 48 + 16, :16] = True
    assert qkv[used].abs().sum() > 0 and qkv[~used].abs().sum() == 0
    assert supernet.full.encoder.layers[1].attn.qkv.weight.grad is None  # layer 2 is not in the sub-network


def test_sandwich_batches_carry_largest_smallest_and_seeded_random_archs() -> None:
    class Tok:
        vocab_size = 50

        def token_id(self, role: str) -> int:
            return {"cls": 2, "sep": 3, "pad": 0}[role]

    task = ClassificationTask.__new__(ClassificationTask)  # collate needs only the special ids
    task.cls_id, task.sep_id, task.pad_id = 2, 3, 0
    sandwich = SandwichTask.__new__(SandwichTask)
    sandwich.task, sandwich.space, sandwich.n_random = task, SPACE, 2
    items = [(np.array([2, 7, 3], dtype=np.int32), None, 0), (np.array([2, 9, 8, 3], dtype=np.int32), None, 1)]
    first = sandwich.collate(items, generator=torch.Generator().manual_seed(5))["archs"]
    again = sandwich.collate(items, generator=torch.Generator().manual_seed(5))["archs"]
    assert first[:2] == [SPACE.largest, SPACE.smallest] and len(first) == 4 and first == again
    assert all(SPACE.contains(a) for a in first)


def test_space_lists_valid_archs_and_counts_parameters_exactly() -> None:
    assert all(a.d_model % a.n_heads == 0 for a in SPACE.archs())
    assert SPACE.largest == Arch(3, 48, 4, 64) and SPACE.smallest == Arch(1, 16, 1, 24)
    arch = Arch(2, 32, 2, 64)
    assert count_params(arch, BASE) == sum(p.numel() for p in Bert(arch.config(BASE)).parameters())
    with pytest.raises(ValueError, match="divides"):
        SearchSpace(d_model=[30], n_heads=[4])
    with pytest.raises(ValueError, match="unknown size"):
        SearchSpace(baselines=["bert-huge"])


def test_latency_model_recovers_a_known_cost_law() -> None:
    truth = np.array([3.0, 2.0, 1.5, 0.4, 0.1, 0.05, 0.2, 0.3])  # ms per unit of each feature
    archs = SPACE.archs()
    ms = [float(features(a, batch=8, seq_len=64) @ truth) for a in archs]
    rng = random.Random(0)
    noisy = [m * (1 + rng.uniform(-0.02, 0.02)) for m in ms]  # 2% measurement noise
    model = LatencyModel.fit(archs[::2], noisy[::2], batch=8, seq_len=64)
    errors = relative_errors(model, archs[1::2], ms[1::2])
    assert max(errors) < 0.05
    assert LatencyModel.from_dict(model.to_dict()).predict(archs[1]) == pytest.approx(model.predict(archs[1]))
    assert set(model.to_dict()["coefficients"]) == set(FEATURES)
    with pytest.raises(ValueError, match="at least 2"):
        LatencyModel.fit(archs[:1], ms[:1], batch=8, seq_len=64)


def test_measured_latency_is_a_positive_median() -> None:
    base = base_config(SPACE, 50, max_seq_len=16)
    assert measure_latency(Arch(1, 16, 1, 24), base, batch=2, seq_len=16, warmup=1, repeats=3) > 0


def test_pareto_front_keeps_only_undominated_rows() -> None:
    rows = [
        {"dev": 0.80, "predicted_ms": 1.0},
        {"dev": 0.79, "predicted_ms": 2.0},
        {"dev": 0.85, "predicted_ms": 3.0},
        {"dev": 0.84, "predicted_ms": 3.5},
        {"dev": 0.90, "predicted_ms": 5.0},
    ]
    assert [r["dev"] for r in pareto_front(rows)] == [0.80, 0.85, 0.90]


TINY = [
    "--data",
    "None",
    "--vocab-size",
    "600",
    "--max-len",
    "32",
    "--space.n-layers",
    "1",
    "2",
    "--space.d-model",
    "16",
    "32",
    "--space.n-heads",
    "1",
    "2",
    "--space.d-ff",
    "32",
    "64",
    "--space.latency-batch",
    "2",
    "--space.latency-seq-len",
    "16",
    "--latency.measure",
    "6",
    "--latency.repeats",
    "2",
    "--supernet.epochs",
    "1",
    "--supernet.candidates",
    "6",
    "--supernet.population",
    "4",
    "--trials.epochs",
    "0.5",
    "--trials.evals",
    "2",
    "--retrain-epochs",
    "0.5",
    "--training.no-progress",
    "--training.peak-tflops",
    "1",
]


@pytest.fixture(scope="module")
def review_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    directory = tmp_path_factory.mktemp("reviews")
    reviews = load_builtin("reviews-sentiment")
    for split, n in (("train", 160), ("dev", 40), ("test", 40)):
        write_jsonl(directory / f"{split}.jsonl", reviews[split][:n])
    return [arg for s in ("train", "dev", "test") for arg in (f"--{s}", str(directory / f"{s}.jsonl"))]


def test_tiny_search_end_to_end_and_an_interrupted_study_resumes(tmp_path: Path, review_files: list[str]) -> None:
    out = tmp_path / "nas"
    args = ["nas", "--out", str(out), *review_files, *TINY]
    assert main([*args, "--trials.n-trials", "2"]) == 0
    found = json.loads((out / "results.json").read_text())
    assert len(found["supernet"]["candidates"]) == 6  # distinct architectures scored with inherited weights
    assert len({r["arch"] for r in found["supernet"]["candidates"]}) == 6
    assert found["supernet"]["pareto"] and found["latency_model"]["held_out_median_relative_error"] >= 0
    assert found["cost"]["supernet_flops"] > 0 and found["cost"]["multi_trial_flops_per_candidate"] > 0
    for r in found["supernet"]["pareto"]:
        directory = Path(r["directory"])
        assert (directory / "model.safetensors").is_file() and load_tokenizer(directory).vocab_size > 0
        for recipe, command in (("pretrain.yaml", "pretrain"), ("finetune.yaml", "finetune classify")):
            with pytest.raises(SystemExit) as done:  # the recipe validates: --help is reached
                main([*command.split(), "-c", str(directory / recipe), "--help"])
            assert done.value.code == 0
    assert "bert-tiny" in found["retrained"] and "test" in found["retrained"]["bert-tiny"]
    assert (out / "pareto.png").stat().st_size > 10_000 and "## Pareto front" in (out / "report.md").read_text()

    # A process that died mid-trial leaves a RUNNING trial behind; the next run fails it and retries its point.
    study = optuna.load_study(study_name="nas", storage=f"sqlite:///{out / 'multi-trial' / 'study.db'}")
    finished = [t for t in study.trials if t.state.is_finished()]
    seen = {tuple(sorted(t.params.items())) for t in finished}
    points = [
        {"n_layers": n, "d_model": d, "n_heads": h, "d_ff": f}
        for n in (1, 2)
        for d in (16, 32)
        for h in (1, 2)
        for f in (32, 64)
    ]
    point = next(p for p in points if tuple(sorted(p.items())) not in seen)
    study.enqueue_trial(point)
    stale = study.ask()  # its architecture drawn, never told: what a killed process leaves
    for key, values in (("n_layers", [1, 2]), ("d_model", [16, 32]), ("n_heads", [1, 2]), ("d_ff", [32, 64])):
        stale.suggest_categorical(key, values)
    supernet_stamp = (out / "supernet" / "results.json").stat().st_mtime_ns
    first_trial = out / "multi-trial" / f"trial-{finished[0].number:04d}" / "results.json"
    trial_stamp = first_trial.stat().st_mtime_ns if first_trial.is_file() else None
    assert main([*args, "--trials.n-trials", "3"]) == 0
    study = optuna.load_study(study_name="nas", storage=f"sqlite:///{out / 'multi-trial' / 'study.db'}")
    states = {t.number: t.state for t in study.trials}
    assert states[stale.number] == optuna.trial.TrialState.FAIL
    retried = [t for t in study.trials if t.number > stale.number]
    assert retried and retried[0].params == point and retried[0].state.is_finished()
    assert sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials) == 3
    assert (out / "supernet" / "results.json").stat().st_mtime_ns == supernet_stamp  # not trained again
    if trial_stamp is not None:
        assert first_trial.stat().st_mtime_ns == trial_stamp
