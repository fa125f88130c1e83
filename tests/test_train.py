"""train.py: each loss against a hand computation, then real runs of the script on tiny data."""
import hashlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("train_stage", REPO / "train.py")
T = importlib.util.module_from_spec(spec)
spec.loader.exec_module(T)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


# ----------------------------------------------------------------------------- losses by hand

def test_prior_adjusted_ce_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    prior = torch.tensor([0.7, 0.2, 0.1])
    for tau in (0.0, 1.0, 2.0):
        z = [2.0 + tau * math.log(0.7), 0.0 + tau * math.log(0.2), -1.0 + tau * math.log(0.1)]
        expected = -(z[1] - math.log(sum(math.exp(v) for v in z)))
        got = T.prior_adjusted_ce(logits, torch.tensor([1]), prior.log(), tau)
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalised inside: e1, e2
    txt = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # (0.6, 0.8), (0, 1)
    s = 10.0
    sim = [[0.6, 0.0], [0.8, 1.0]]  # sim[i][j] = img_i . txt_j
    lse = lambda row: math.log(sum(math.exp(s * v) for v in row))
    i2t = [-(s * sim[i][i] - lse(sim[i])) for i in range(2)]
    t2i = [-(s * sim[j][j] - lse([sim[0][j], sim[1][j]])) for j in range(2)]
    expected = 0.5 * (sum(i2t) / 2 + sum(t2i) / 2)
    assert T.info_nce(img, txt, s).item() == pytest.approx(expected, rel=1e-5)
    # Same class for both: masking leaves each row only its positive, so the loss is zero.
    masked = T.info_nce(img, txt, s, torch.tensor([3, 3]), mask_same_class=True)
    assert masked.item() == pytest.approx(0.0, abs=1e-6)


def test_logit_kd_by_hand():
    zs, zt, temp = [1.0, 0.0], [0.0, 2.0], 2.0
    soft = lambda z: [math.exp(v / temp) / sum(math.exp(u / temp) for u in z) for v in z]
    ps, pt = soft(zs), soft(zt)
    expected = temp ** 2 * sum(p * math.log(p / q) for p, q in zip(pt, ps))
    assert T.logit_kd(torch.tensor([zs]), torch.tensor([zt]), temp).item() == pytest.approx(expected, rel=1e-5)


def test_imitation_mse_by_hand():
    s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    r = 1 / math.sqrt(2)
    expected = (1 - r) ** 2 + r ** 2
    assert T.imitation_loss(s, t, "mse").item() == pytest.approx(expected, rel=1e-5)
    assert T.imitation_loss(s, t, "contrastive", 5.0).item() == pytest.approx(T.info_nce(s, t, 5.0).item())


def test_alignment_by_hand():
    class_text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    student, teacher, tau = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]]), 0.5
    r = 1 / math.sqrt(2)
    s_logit, t_logit = [r / tau, r / tau, -r / tau], [1 / tau, 0.0, -1 / tau]
    soft = lambda z: [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    kl = lambda p, q: sum(a * math.log(a / b) for a, b in zip(p, q))
    assert T.alignment_loss(student, teacher, class_text, tau).item() == pytest.approx(kl(soft(t_logit), soft(s_logit)), rel=1e-5)
    # top-2 of the teacher: classes 0 and 1 only.
    got = T.alignment_loss(student, teacher, class_text, tau, topk=2).item()
    assert got == pytest.approx(kl(soft(t_logit[:2]), soft(s_logit[:2])), rel=1e-5)
    # The teacher says class 0; an image labelled 1 is left out, so nothing remains to align.
    assert T.alignment_loss(student, teacher, class_text, tau, torch.tensor([1]), correct_only=True).item() == 0.0
    assert T.alignment_loss(student, teacher, class_text, tau, torch.tensor([0]), correct_only=True).item() > 0


def test_group_accuracy_boundaries():
    counts = [101, 100, 20, 19]  # many, medium, medium, few
    labels = torch.tensor([0, 1, 2, 3, 3])
    preds = torch.tensor([0, 0, 2, 3, 0])
    acc = T.group_accuracy(preds, labels, counts)
    assert acc == {"top1": pytest.approx(0.6), "many": 1.0, "medium": 0.5, "few": 0.5}


# ----------------------------------------------------------------------------- real runs

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm") / "fmnist-lt"
    subprocess.run([sys.executable, REPO / "prepare.py", "fashion-mnist-lt", "--out", out, "--max-per-class", "60",
                    "--imbalance", "10", "--val-per-class", "10", "--test-per-class", "10"], check=True, capture_output=True)
    return out


def run_train(data, out, *args, check=True, timeout=300):
    cmd = [sys.executable, REPO / "train.py", "--data", data, "--out", out, "--batch-size", "32", "--log-every", "2", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def write_text_feats(data, out, labels, num_prompts=3, dim=16, noise=0.5, seed=0, prompts=None, split="train.txt"):
    """Per-image text features with a sidecar as encode.py writes them: class vector + noise per caption."""
    rng = np.random.default_rng(seed)
    class_vecs = rng.normal(size=(10, dim))
    feats = class_vecs[labels][:, None, :] + noise * rng.normal(size=(len(labels), num_prompts, dim))
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "text.npy", feats.astype(np.float16))
    prompts = prompts or [f"p{k}" for k in range(num_prompts)]
    sidecar = {"kind": "text", "encoder": "test-vectors", "prompts": prompts, "shape": list(feats.shape),
               "split_sha256": hashlib.sha256((data / split).read_bytes()).hexdigest()}
    (out / "text.json").write_text(json.dumps(sidecar))
    return out / "text.npy"


def labels_of(data, split="train.txt"):
    return np.array([int(line.rsplit(maxsplit=1)[1]) for line in (data / split).read_text().splitlines()])


def test_train_plain_then_with_text(data, tmp_path):
    plain = tmp_path / "plain"
    run_train(data, plain, "--epochs", 3, "--lr", 0.05)
    rows = metrics(plain)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    assert any("val_top1" in r and "val_few" in r for r in rows)
    final = torch.load(plain / "final.pt", weights_only=True)
    assert final["format"] == "vlmkd-final-1" and final["classes"][0] == "T-shirt/top"
    assert final["class_counts"] == [int(60 * 10 ** (-c / 9)) for c in range(10)]
    assert "text_head" not in final
    student = T.Student(final["arch"], final["num_classes"], final["preprocess"]["res"])
    student.load_state_dict(final["model"])
    assert (plain / "train.py").read_text() == (REPO / "train.py").read_text()
    assert json.loads((plain / "config.json").read_text())["epochs"] == 3

    # The plain run as a frozen vision teacher: logit KD is logged beside the classification loss.
    kd = tmp_path / "kd"
    run_train(data, kd, "--epochs", 1, "--teacher", plain / "final.pt", "--kd-weight", 0.5, "--kd-temp", 2)
    rows = [r for r in metrics(kd) if "loss_kd" in r]
    assert rows and all(r["loss"] == pytest.approx(r["loss_cls"] + 0.5 * r["loss_kd"], rel=1e-4) for r in rows)

    text = write_text_feats(data, tmp_path / "text", labels_of(data))
    with_text = tmp_path / "text-run"
    run_train(data, with_text, "--epochs", 3, "--lr", 0.05, "--text", text, "--text-weight", 1.0, "--learn-temp")
    rows = [r for r in metrics(with_text) if "loss_text" in r]
    assert rows[-1]["loss_text"] < rows[0]["loss_text"]
    assert all(r["loss"] == pytest.approx(r["loss_cls"] + r["loss_text"], rel=1e-4) for r in rows)
    final = torch.load(with_text / "final.pt", weights_only=True)
    head = final["text_head"]
    assert head["text_dim"] == 16 and head["prompts"] == ["p0", "p1", "p2"] and head["logit_scale"] > 0
    assert set(final["model"]) == set(torch.load(plain / "final.pt", weights_only=True)["model"])


def test_misaligned_text_refused(data, tmp_path):
    text = write_text_feats(data, tmp_path / "text", labels_of(data, "val.txt"), split="val.txt")
    proc = run_train(data, tmp_path / "run", "--epochs", 1, "--text", text, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "another split" in last and "text.npy" in last


def test_prompt_subset_uses_only_those_slots(data, tmp_path):
    text = write_text_feats(data, tmp_path / "text", labels_of(data), num_prompts=5,
                            prompts=["general", "t1", "t2", "t3", "t4"])
    # Poison the slots that must not be used: any read of them makes the loss non-finite and the run fail.
    feats = np.load(text)
    feats[:, [1, 2, 4]] = np.nan
    np.save(text, feats)
    run = tmp_path / "subset"
    run_train(data, run, "--epochs", 1, "--text", text, "--prompts", "general,t3")
    assert torch.load(run / "final.pt", weights_only=True)["text_head"]["prompts"] == ["general", "t3"]
    deploy = tmp_path / "deploy"
    run_train(data, deploy, "--epochs", 1, "--text", text, "--prompts", "general,t3", "--drop-text-head")
    final = torch.load(deploy / "final.pt", weights_only=True)
    assert "text_head" not in final and not any(k.startswith(("proj", "adaptor", "text_head")) for k in final["model"])
    proc = run_train(data, tmp_path / "all", "--epochs", 1, "--text", text, check=False)
    assert proc.returncode != 0 and "non-finite loss at step" in proc.stderr
    proc = run_train(data, tmp_path / "bad", "--epochs", 1, "--text", text, "--prompts", "general,t9", check=False)
    assert proc.returncode != 0 and "t9" in proc.stderr.strip().splitlines()[-1]


def test_unknown_arch_lists_known(data, tmp_path):
    proc = run_train(data, tmp_path / "r", "--arch", "resnet33", check=False)
    assert proc.returncode != 0 and "resnet32" in proc.stderr and "resnet50" in proc.stderr


def test_kill_and_resume_matches_one_run(data, tmp_path):
    args = ["--epochs", 4, "--lr", 0.05, "--ema", 0.9]
    whole = tmp_path / "whole"
    run_train(data, whole, *args)
    killed = tmp_path / "killed"
    cmd = [sys.executable, REPO / "train.py", "--data", data, "--out", killed, "--batch-size", "32", "--log-every", "2", *map(str, args)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "ckpt.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.pt").exists(), "the run finished before it could be killed"
    run_train(data, killed, *args, "--resume")
    a = torch.load(whole / "final.pt", weights_only=True)["model"]
    b = torch.load(killed / "final.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_processes_see_each_sample_once(data, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           REPO / "train.py", "--data", data, "--out", run, "--batch-size", "16", "--epochs", 2, "--log-every", 2]
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = len(labels_of(data))
    cover = [r for r in metrics(run) if "rows_seen" in r]
    assert len(cover) == 2
    for r in cover:
        assert r["rows_max_repeat"] == 1
        assert r["rows_seen"] >= n - 2 * 16  # only each process's last partial batch is dropped
    config = json.loads((run / "config.json").read_text())
    assert config["batch_size"] == 16
    assert "world size 2" in proc.stdout


def test_compile(data, tmp_path):
    run = tmp_path / "compiled"
    run_train(data, run, "--epochs", 1, "--compile", "--max-steps", 3, timeout=600)
    assert (run / "final.pt").exists()
    assert any("loss" in r for r in metrics(run))


def test_class_text_must_start_with_training_classes(data, tmp_path):
    names = (data / "classes.txt").read_text().splitlines()
    feats = np.eye(12, 8, dtype=np.float16)
    np.save(tmp_path / "classes.npy", feats)
    (tmp_path / "classes.json").write_text(json.dumps({"kind": "classes", "names": names[::-1] + ["x", "y"]}))
    proc = run_train(data, tmp_path / "r", "--head", "cosine", "--class-text", tmp_path / "classes.npy", check=False)
    assert proc.returncode != 0 and "do not start with the 10 classes" in proc.stderr.strip().splitlines()[-1]


def test_unreadable_image_recorded_and_skipped(data, tmp_path):
    import shutil
    copy = tmp_path / "data"
    shutil.copytree(data, copy, ignore=shutil.ignore_patterns(".ffcv"))
    bad = (copy / "train.txt").read_text().splitlines()[3].rsplit(maxsplit=1)[0]
    (copy / bad).write_bytes(b"not a png")
    run = tmp_path / "run"
    run_train(copy, run, "--epochs", 1, "--batch-size", 16)
    errors = [json.loads(line) for path in (copy / ".ffcv").glob("train-*.errors.jsonl") for line in path.read_text().splitlines()]
    assert [(e["index"], e["path"]) for e in errors] == [(3, bad)]
    cover = [r for r in metrics(run) if "rows_seen" in r][0]
    assert cover["rows_max_repeat"] == 1 and cover["rows_seen"] <= len(labels_of(copy)) - 1
