"""benchmarks/: argument checks of bench_prefill.py, its batched run on tiny shapes (batch = one-by-one before any
time) for the LLaVA and Qwen2.5-VL hosts, the skipped-method list, and the one-shot GPU script (benchmarks/gpu.sh
--tiny) on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_prefill as bp  # noqa: E402
import device_contract as dc  # noqa: E402
import gpu_bench  # noqa: E402


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a benchmark model is built."""
    def refuse(*a, **k):
        raise AssertionError("a model was built before the arguments were checked")
    monkeypatch.setattr(bp, "build_model", refuse)


BAD = [
    (["--batch", "0"], "--batch 0"),
    (["--batch", "2", "2"], "repeated"),
    (["--keep", "-1"], "--keep -1"),
    (["--keep-ratio", "1.5"], "--keep-ratio 1.5"),
    (["--repeats", "0"], "--repeats 0"),
    (["--decode-tokens", "-2"], "--decode-tokens -2"),
    (["--dtype", "bf16"], "'bf16'"),
    (["--device", "tpu"], "'tpu'"),
    (["--attn", "flash"], "'flash'"),
    (["--attn", "flash_attention_2"], "flash_attention_2"),
    (["--methods", "fastvv"], "did you mean 'fastv'"),
    (["--methods", "mqt"], "mqt"),  # registered, but cannot run on a model without an MQT projector
    (["--param", "oops"], "'oops'"),
    (["--param", "fastv.layer_k=3"], "layer_k"),
    (["--param", "pool.seed=1"], "pool"),  # pool is registered but not among --methods
    (["--k", "24"], "--k 24"),
    (["--size", "huge"], "'huge'"),
    (["--host", "next", "--image-size", "abc"], "'abc'"),
    (["--official-attention", "mustdrop", "--methods", "pool"], "mustdrop"),
    (["--host", "qwen"], "'qwen'"),
    (["--host", "qwen2.5-vl", "--image-size", "20x20"], "--image-size 20x20"),
    (["--host", "qwen2.5-vl", "--image-size", "28x6000"], "aspect ratio"),
    (["--host", "qwen2.5-vl", "--size", "tiny", "--k", "4"], "--k 4"),
    (["--host", "qwen2.5-vl", "--methods", "mqt", "--keep", "16"], "patch merger"),  # no LLaVA projector to replace
    # the packed tower refuses MustDrop's ViT merge when it is asked for
    (["--host", "qwen2.5-vl", "--methods", "mustdrop", "--param", "mustdrop.merging=true"], "packs all images"),
]
if not torch.cuda.is_available():
    BAD.append((["--device", "cuda"], "no CUDA device"))


@pytest.mark.parametrize("argv, needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_argument_exits_2_with_one_line(argv, needle, capsys, no_model, tmp_path):
    if argv[:2] == ["--param", "pool.seed=1"]:
        argv = argv + ["--methods", "fastv"]
    rc = bp.main(argv + ["--out", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0] and "Traceback" not in err


def test_out_folder_is_refused(capsys, no_model, tmp_path):
    assert bp.main(["--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_bad_argument_from_the_command_line():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_prefill.py"), "--batch", "0"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "--batch 0" in p.stderr and "Traceback" not in p.stderr
    assert p.stdout == ""


def test_dtype_auto_follows_the_device():
    from vlprune.precision import native_bf16

    name, why = bp.resolve_dtype("auto", "cpu")
    assert name == ("bfloat16" if native_bf16("cpu") else "float32")
    assert why.startswith("auto: ")
    assert bp.resolve_dtype("float32", "cpu") == ("float32", "as asked")


def test_default_methods_skip_what_cannot_run_with_the_reason():
    import vlprune

    names = vlprune.list_methods()
    methods = bp.build_methods(names, [{"keep": 64}], 2, {}, explicit=False)
    skipped = bp.probe_methods(methods, "llava")
    assert set(skipped) == {"mqt"}
    assert "MQT projector" in skipped["mqt"]
    # a ratio budget: mqt counts tokens, so it cannot even be built; the others run
    methods = bp.build_methods(names, [{"keep_ratio": 0.25}], 2, {}, explicit=False)
    assert set(bp.probe_methods(methods, "next")) == {"mqt"}


def test_compare_answers_exact_near_tie_and_failure():
    V = 5
    lg = torch.zeros(3, V)
    lg[:, 1] = 1.0
    alone_tokens = torch.tensor([1, 1, 1])
    ok = bp.compare_answers(alone_tokens, lg.clone(), alone_tokens, lg, "float32")
    assert ok["ok"] and ok["exact"]
    # the batched run has a near-tie at step 1 (within twice the first step's noise) and picks token 2 there
    b_lg = lg.clone()
    b_lg[0, 3] += 0.4e-3  # first-step noise 4e-4 (0.04% of the magnitude 1.0: under the float32 limit)
    a_lg = lg.clone()
    a_lg[1, 2] = 1.0 - 5e-4
    b_lg[1, 2] = 1.0 + 1e-4
    tie = bp.compare_answers(torch.tensor([1, 2, 2]), b_lg, alone_tokens, a_lg, "float32")
    assert tie["ok"] and not tie["exact"] and tie["step"] == 1
    # parting by a wide margin fails
    far = bp.compare_answers(torch.tensor([1, 3, 3]), b_lg, alone_tokens, a_lg, "float32")
    assert not far["ok"] and "step 1" in far["why"]
    # first-step logits that differ by more than the dtype's noise limit fail at once
    off = lg.clone()
    off[0, 4] = 0.5
    assert not bp.compare_answers(alone_tokens, off, alone_tokens, lg, "bfloat16")["ok"]


def test_batched_tiny_run_reports_every_column(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bp.main(["--size", "tiny", "--batch", "1", "3", "--decode-tokens", "3", "--repeats", "1", "--threads", "1",
                  "--dtype", "float32", "--methods", "pool", "fastv", "cls_attn", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "dtype float32 (as asked)" in printed
    res = json.loads(out.read_text())
    assert res["batch"] == [1, 3] and len(set(res["prompt_lengths"])) == 3  # questions of different lengths
    rows = {r["key"]: r for r in res["rows"]}
    assert set(rows) == {f"b{b} {m}" for b in (1, 3) for m in ("unpruned", "pool", "fastv k=2", "cls_attn")}
    for r in rows.values():
        assert r["check"]["ok"] and r["check"]["samples"] == r["batch"]
        assert 0 < r["flops_ratio"] <= 1 and r["of_ideal"] == pytest.approx(r["speedup"] * r["flops_ratio"])
        assert r["ttft_s"] > 0 and r["generate_samples_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["kv_bytes_per_sample"] > 0 and r["peak_bytes"] is not None
        assert set(r["stages_s"]) >= {"vision tower", "projector", "decoder", "lm_head", "total"}
        assert len(r["answers"]) == r["batch"]
    assert rows["b3 fastv k=2"]["stage"] == "in-LLM" and rows["b3 fastv k=2"]["target"] == 0.8
    assert rows["b3 pool"]["stage"] == "pre-LLM" and rows["b3 pool"]["target"] == 0.9
    assert rows["b3 pool"]["kept"] == 64
    # the KV cache per sample after M tokens shrinks with the pruning
    assert rows["b3 pool"]["kv_bytes_per_sample"] < rows["b3 unpruned"]["kv_bytes_per_sample"]
    for r in rows.values():  # rows below their target say where the time went
        if r.get("meets_target") is False:
            assert "decoder" in r["profile"] and "vision tower" in r["profile"]
    md = out.with_suffix(".md").read_text()
    assert "of ideal (target)" in md and "batch = one-by-one" in md and "TTFT s" in md


def test_contract_checks_hold_in_float32_on_cpu():
    res = dc.run_contract("cpu", "float32", "sdpa", ["pool"], log=lambda m: None)
    assert res["summary"]["errors"] == 0
    for rec in res["records"]:
        assert rec["identity_ok"] and rec["remove_ok"] and rec["batch_ok"] and rec["cache_ok"], rec


def test_gpu_bench_refuses_bad_arguments(tmp_path, capsys):
    assert gpu_bench.main([str(tmp_path), "--tiny", "--time-budget", "0"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        assert gpu_bench.main([str(tmp_path), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_gpu_sh_tiny_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu.sh --tiny: the GPU run's code path on tiny shapes, so that its first run on a GPU does not
    fail on a typo."""
    out = tmp_path / "gpu"
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out), "--tiny", "--device", "cpu",
                        "--threads", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "gpu_bench.json").read_text())
    assert set(res["sections"]) == {"contract", "llava", "next"}
    assert all("error" not in s for s in res["sections"].values()), res["sections"]
    assert res["sections"]["contract"]["summary"]["errors"] == 0
    for host in ("llava", "next"):
        sec = res["sections"][host]
        assert "mqt" in sec["skipped_methods"]
        keys = {r["key"] for r in sec["rows"]}
        assert {"b1 unpruned", "b2 unpruned", "b2 fastv k=2", "b2 pool", "b2 hired"} <= keys
        for r in sec["rows"]:
            assert "error" in r or (r["flops_ratio"] > 0 and r["check"]["ok"])
    md = (out / "gpu_bench.md").read_text()
    assert "## contract" in md and "## llava" in md and "## next" in md
    # configurations whose batched answers differ from one-by-one are findings: reported with the reason, no times
    failed = [r for s in ("llava", "next") for r in res["sections"][s]["rows"] if "error" in r]
    assert all("batched answers differ" in r["error"] and "prefill_s" not in r for r in failed)
    assert all(f"finding: {s} {r['key']}" in p.stdout for s in ("llava", "next")
               for r in res["sections"][s]["rows"] if "error" in r)


# --------------------------------------------------------------------------------------------- Qwen2.5-VL host
def test_qwen_default_methods_skip_mqt_and_run_mustdrop_without_the_vit_merge():
    import vlprune

    names = vlprune.list_methods()
    args = bp.parse_args(["--host", "qwen2.5-vl", "--size", "tiny", "--keep-ratio", "0.25", "0.1"])
    assert args.params["mustdrop"] == {"merging": False} and "mustdrop" in args.host_params
    assert args.image_wh == bp.TINY_QWEN_IMAGE
    skipped = bp.probe_methods(args.method_objs, "qwen2.5-vl")
    assert set(skipped) == {"mqt"} and "patch merger" in skipped["mqt"]
    labels = {c.label for c in bp.make_configs(args, skipped)}
    assert "mustdrop merging=False keep_ratio=0.25" in labels and not any(lb.startswith("mqt") for lb in labels)
    notes = bp.host_param_notes(args, skipped)
    assert "merging=False" in notes["mustdrop"] and "packs all images" in notes["mustdrop"]
    # without the host's value, mustdrop's default ViT merge is refused with the reason
    methods = bp.build_methods(names, [{"keep": 16}], 2, {}, explicit=False)
    skipped = bp.probe_methods(methods, "qwen2.5-vl")
    assert set(skipped) == {"mqt", "mustdrop"} and "merging=False" in skipped["mustdrop"]
    # asked for explicitly, the value is the caller's and the label stays plain
    args = bp.parse_args(["--host", "qwen2.5-vl", "--size", "tiny", "--methods", "mustdrop",
                          "--param", "mustdrop.merging=false"])
    assert args.host_params == {} and {c.label for c in bp.make_configs(args, {})} == {"unpruned", "mustdrop"}
    # the default image sizes and the layers --k is checked against
    assert bp.parse_args(["--host", "qwen2.5-vl", "--methods", "pool"]).image_wh == (896, 896)
    assert bp.parse_args(["--methods", "pool"]).image_wh == (336, 336)
    assert bp.text_layers("7b", "qwen2.5-vl") == 28 and bp.text_layers("bench-S", "qwen2.5-vl") == 24


def test_qwen_single_slices_the_packed_pixels_per_sample():
    from vlprune.hosts_tiny import host_prompt, tiny_host_inputs, tiny_qwen2_5_vl
    from vlprune.testing import synthetic_image

    _, proc = tiny_qwen2_5_vl(seed=0)
    images = [synthetic_image(wh, seed=i) for i, wh in enumerate([(112, 84), (224, 168), (168, 112)])]
    prompts = [host_prompt(proc, q) for q in ("What?", "What is shown in this image? Describe it.", "Colour?")]
    batch = tiny_host_inputs(proc, images, prompts, padding_side="left")
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
    for b in range(3):
        alone = tiny_host_inputs(proc, [images[b]], [prompts[b]])
        got = bp.single(dict(batch), b)
        assert set(got) == set(alone)
        for k in alone:
            assert torch.equal(got[k], alone[k]), (b, k)


def test_qwen_bench_s_shapes():
    """The bench-S config (not built: its shapes only) and the visual tokens of the default 896x896 image."""
    from transformers import Qwen2_5_VLConfig

    s = bp.QWEN_SIZES["bench-S"]
    assert s["text"]["hidden_size"] == 1024 and s["text"]["num_hidden_layers"] == 24
    assert s["text"]["num_attention_heads"] == 16 and s["text"]["num_key_value_heads"] == 4
    head = s["text"]["hidden_size"] // s["text"]["num_attention_heads"]
    assert sum(s["text"]["mrope_section"]) == head // 2
    assert s["vision"]["out_hidden_size"] == s["text"]["hidden_size"]
    Qwen2_5_VLConfig(vision_config=dict(s["vision"]))  # accepted by transformers
    s7 = bp.QWEN_SIZES["7b"]
    assert sum(s7["text"]["mrope_section"]) == s7["text"]["hidden_size"] // s7["text"]["num_attention_heads"] // 2
    from vlprune.hosts_tiny import _qwen_processor
    from transformers import Qwen2_5_VLProcessor

    _, proc = _qwen_processor(Qwen2_5_VLProcessor, 14, bp.QWEN_MIN_PIXELS, bp.QWEN_MAX_PIXELS)
    inputs = bp.build_inputs(proc, 2, 50, (896, 896))
    assert inputs["image_grid_thw"].tolist() == [[1, 64, 64]] * 2
    assert (inputs["mm_token_type_ids"] == 1).sum(1).tolist() == [1024, 1024]
    assert inputs["attention_mask"][:, 0].tolist() != [1, 1]  # left padded: questions of different lengths


def test_qwen_tiny_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "qwen.json"
    methods = ["pool", "fastv", "hired", "mustdrop", "transprune"]
    rc = bp.main(["--host", "qwen2.5-vl", "--size", "tiny", "--batch", "1", "3", "--keep-ratio", "0.25", "0.1",
                  "--decode-tokens", "2", "--repeats", "1", "--threads", "1", "--dtype", "float32",
                  "--methods", *methods, "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = json.loads(out.read_text())
    assert res["host"] == "qwen2.5-vl" and "Qwen2.5-VL" in res["model"] and res["image_tokens"] == 64
    assert len(set(res["prompt_lengths"])) == 3
    assert "merging=False" in res["host_params"]["mustdrop"]
    rows = {r["key"]: r for r in res["rows"]}
    labels = ["unpruned"] + [f"{m}{' k=2' if m == 'fastv' else ''}{' merging=False' if m == 'mustdrop' else ''} "
                             f"keep_ratio={r}" for m in methods for r in ("0.25", "0.1")]
    assert set(rows) == {f"b{b} {lb}" for b in (1, 3) for lb in labels}
    for r in rows.values():
        assert r["check"]["ok"] and r["check"]["samples"] == r["batch"]
        assert 0 < r["flops_ratio"] <= 1 and r["of_ideal"] == pytest.approx(r["speedup"] * r["flops_ratio"])
        assert r["ttft_s"] > 0 and r["kv_bytes_per_sample"] > 0 and r["visual_in"] == 64
        assert r["stages_s"]["vision tower"] > 0 and r["stages_s"]["decoder"] > 0
        assert r["method"] == "unpruned" or 0 < r["method_share"] < 1
    assert rows["b3 pool keep_ratio=0.25"]["kept"] == 16 and rows["b3 pool keep_ratio=0.1"]["kept"] == 6
    assert rows["b3 pool keep_ratio=0.1"]["flops_ratio"] < rows["b3 pool keep_ratio=0.25"]["flops_ratio"] < 1
    assert rows["b3 fastv k=2 keep_ratio=0.1"]["target"] == 0.8 and rows["b3 pool keep_ratio=0.1"]["target"] == 0.9
    assert rows["b3 hired keep_ratio=0.25"]["cost"]["vision"] == rows["b3 unpruned"]["cost"]["vision"]
    md = out.with_suffix(".md").read_text()
    assert "Qwen2.5-VL" in md and "mustdrop merging=False keep_ratio=0.1" in md and "method's work" in md
    assert "runs with merging=False" in md
