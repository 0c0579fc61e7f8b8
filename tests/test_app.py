"""The Gradio demo (app.py) as a real server: started as a subprocess on a free port, driven with gradio_client and
headless Chromium, stopped by its process id.

Skips with a reason when gradio / gradio_client (the ``app`` extra) is missing; the browser test also skips when
selenium, Debian's ``chromium`` or ``chromium-driver`` is missing. Uses the shipped proxy LVLM (offline).
"""
from __future__ import annotations

import os

for _k, _v in {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}.items():
    os.environ.setdefault(_k, _v)

import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("gradio", reason="gradio is not installed: the demo needs the app extra (pip install -e '.[app]')")
pytest.importorskip("gradio_client", reason="gradio_client is not installed (it comes with gradio: pip install -e '.[app]')")

from gradio_client import Client, handle_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 1_500_000  # a small upload limit, so that the oversized file stays cheap
MAX_SIDE = 1024
BUDGET = 64
STARTUP_S = 150


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def client(self) -> Client:
        return Client(self.url, verbose=False, analytics_enabled=False, download_files=False)

    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``python app.py`` on a free port (the proxy, small upload limits); stopped by its pid in the finalizer."""
    tmp = tmp_path_factory.mktemp("app")
    port = _free_port()
    log = tmp / "server.log"
    env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp / "gradio"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--max-upload-bytes", str(MAX_BYTES),
           "--max-image-side", str(MAX_SIDE), "--max-image-pixels", str(MAX_SIDE * MAX_SIDE)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    srv = Server(proc, url, log)
    try:
        deadline = time.time() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode} before serving:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.time() > deadline:
                pytest.fail(f"app.py did not serve {url} within {STARTUP_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield srv
    finally:
        pid = proc.pid
        if proc.poll() is None:
            os.kill(pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                proc.wait(timeout=15)
        assert proc.poll() is not None, f"app.py (pid {pid}) is still running"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Two proxy-benchmark scenes as PNG files with their questions and answers."""
    from evals.proxy.scenes import make_sample, render, split_seed

    folder = tmp_path_factory.mktemp("scenes")
    out = []
    for i, fam in enumerate(("attribute", "counting")):
        s = make_sample(split_seed("test", 10 + i), fam)
        p = folder / f"scene_{i}.png"
        render(s.scene).save(p)
        out.append((str(p), s.question, s.answer))
    return out


def _run(client: Client, image: str, question: str, methods, budget=BUDGET, params="{}", job=False):
    args = dict(image=handle_file(image), question=question, methods=list(methods), budget=budget, params=params,
                max_new_tokens=4, repeats=1, api_name="/run")
    return client.submit(**args) if job else client.predict(**args)


def _raw(out) -> dict:
    answers, gallery, table, plot, raw, status = out
    assert isinstance(raw, dict), f"raw output is {type(raw).__name__}: {raw!r}"
    return raw


def _summary(raw: dict) -> list[tuple]:
    return [(r["name"], r["answer"], r["kept"], r["error"]) for r in raw["rows"]]


SEQUENTIAL: dict = {}


def test_hyperparameter_widgets_follow_the_registry():
    """Every registered method gets its widgets from its dataclass fields; at their defaults they send no overrides
    and, with the request's budget, build the method. Bad values are refused with the value named."""
    import vlprune
    from vlprune_app.params import changed_values, method_kwargs, method_specs, parse_budget, parse_overrides

    specs = method_specs()
    assert list(specs) == vlprune.list_methods()
    for name, spec in specs.items():
        assert changed_values(spec, [p.widget_value() for p in spec.params]) == {}, name
        vlprune.get_method(name, **method_kwargs(name, spec, parse_budget(64), {}))
    assert parse_budget(64) == {"keep": 64} and parse_budget("0.25") == {"keep_ratio": 0.25}
    with pytest.raises(ValueError, match=r"budget must be > 0.*-1"):
        parse_budget(-1)
    fastv = specs["fastv"]
    assert method_kwargs("fastv", fastv, {"keep": 64}, parse_overrides('{"fastv": {"k": "3"}}', specs)) == \
        {"keep": 64, "k": 3}
    assert method_kwargs("fastv", fastv, {"keep": 64}, {"fastv": {"keep_ratio": 0.5}}) == {"keep_ratio": 0.5}
    with pytest.raises(ValueError, match=r"fastv: k='x' is not a valid int"):
        parse_overrides({"fastv": {"k": "x"}}, specs)
    with pytest.raises(ValueError, match=r"unknown method 'fastvv'; registered: "):
        parse_overrides({"fastvv": {}}, specs)


def test_cli_refuses_a_missing_model_with_a_clear_message(tmp_path):
    missing = tmp_path / "no-such-model"
    r = subprocess.run([sys.executable, str(ROOT / "app.py"), "--model", str(missing)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert f"--model {str(missing)!r}" in r.stderr and "proxy-next" in r.stderr, r.stderr[-2000:]
    assert "proxy-mqt" in r.stderr, r.stderr[-2000:]


def test_mistyped_proxy_name_fails_at_once_with_the_proxy_names():
    from vlprune_app.engine import load_model

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"'proxy-nxt'.*\(proxy, proxy-next, proxy-mqt\).*Did you mean 'proxy-next'"):
        load_model("proxy-nxt")
    assert time.perf_counter() - t0 < 5, "no hub round trip for a name that cannot be a model"


def test_budget_messages_name_whole_numbers():
    from vlprune_app.params import parse_budget

    with pytest.raises(ValueError, match=r"budget 1\.5 is above 1 .*\(e\.g\. 1 or 2\) or a share below 1"):
        parse_budget(1.5)
    with pytest.raises(ValueError, match=r"\(e\.g\. 64 or 65\)"):
        parse_budget("64.5")


# ------------------------------------------------------------------------------------- in-process: Session and cards
@pytest.fixture(scope="module")
def sessions():
    """Sessions on the shipped proxy models, loaded once per module and only when a test asks for one."""
    from vlprune_app.engine import Session, load_model

    cache = {}

    def get(spec: str):
        if spec not in cache:
            model, processor = load_model(spec)
            cache[spec] = Session(model, processor, spec)
        return cache[spec]
    return get


def _pil(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def test_timing_rounds_interleave_the_methods(sessions, scenes):
    """By default every method is timed 3 times, in rounds that take all methods in turn, each round starting one
    method later; the reported time is the median of that method's rounds."""
    import statistics

    import vlprune
    from vlprune_app.engine import DEFAULT_REPEATS

    session = sessions("proxy")
    image, question, _ = scenes[0]
    methods = [(m, vlprune.get_method(m, keep=BUDGET)) for m in ("pool", "fastv")]
    comp = session.compare(_pil(image), question, methods, max_new_tokens=1)
    assert DEFAULT_REPEATS >= 3 and comp.repeats == DEFAULT_REPEATS
    names = ["unpruned", "pool", "fastv"]
    rounds = [[n for r, n in comp.timing_order if r == k] for k in range(comp.repeats)]
    assert rounds == [names[k % 3:] + names[:k % 3] for k in range(comp.repeats)], comp.timing_order
    for row in comp.rows:
        assert len(row.prefill_runs_ms) == len(row.e2e_runs_ms) == comp.repeats
        assert row.prefill_ms == statistics.median(row.prefill_runs_ms)
        assert row.e2e_ms == statistics.median(row.e2e_runs_ms)


def test_prefill_slower_than_end_to_end_is_flagged(sessions, scenes, monkeypatch):
    import vlprune
    from vlprune_app.ui import render_outputs

    session = sessions("proxy")
    image, question, _ = scenes[0]
    # the unpruned model's prefill "takes" longer than its whole generate: a busy machine
    monkeypatch.setattr(session, "_time", lambda method, inputs, n: (0.3, 0.2) if method is None else (0.01, 0.02))
    comp = session.compare(_pil(image), question, [("pool", vlprune.get_method("pool", keep=BUDGET))],
                           max_new_tokens=1, repeats=2)
    base, pool = comp.rows
    assert "prefill (300 ms) timed slower than end-to-end (200 ms)" in base.timing_note
    assert pool.timing_note is None
    answers, cards, table, df, raw, status = render_outputs(session, comp)
    assert "slower than e2e" in table[0][7] and "slower than e2e" not in table[1][7]
    assert "1 method(s) timed a prefill slower than their end-to-end run" in status
    assert "prefill (300 ms) timed slower" in cards[0][1]


def test_card_says_why_kept_exceeds_the_budget(sessions):
    """Kept tokens above the budget are explained on the card from the stats (AnyRes newline tokens); within the
    budget, no note."""
    import vlprune
    from vlprune_app.engine import MethodResult
    from vlprune_app.ui import budget_note, render_outputs

    def row(kept, newlines, budget=64):
        return MethodResult(name="hired", label="hired", params={}, visual_tokens=1464, kept=kept, budget=budget,
                            newlines_kept=newlines)

    assert budget_note(row(64, 24)) is None and budget_note(row(60, 0)) is None
    assert budget_note(row(112, 48)) == ("kept 112 > budget 64: 48 of them are newline tokens (one per row of the "
                                         "AnyRes grid), which this method keeps beside its 64 image tokens")
    assert "the image tokens exceed the budget by 6 too" in budget_note(row(94, 24))
    assert budget_note(row(70, 0)) == "kept 70 > budget 64: the method's own rule keeps 6 more than the budget"

    session = sessions("proxy-next")
    from evals.proxy.scenes import make_sample, render, split_seed

    scene = render(make_sample(split_seed("test", 3), "counting", geometry="next").scene)
    methods = [(m, vlprune.get_method(m, keep=BUDGET)) for m in ("hired", "globalcom2", "todre")]
    comp = session.compare(scene, "how many objects are there ?", methods, max_new_tokens=1, repeats=1)
    n_newline = int((comp.layout.kind == 1).sum())
    assert n_newline > 0
    answers, cards, table, df, raw, status = render_outputs(session, comp)
    for r, (pic, caption) in zip(comp.rows[1:], cards[1:]):
        assert r.error is None, r.error
        assert r.budget == BUDGET and 0 <= r.newlines_kept <= min(r.kept, n_newline)
        if r.kept > BUDGET:  # the card says why, whatever the methods' budget rule is today
            assert f"kept {r.kept} > budget {BUDGET}" in caption, caption
            if r.newlines_kept:
                assert f"{r.newlines_kept} of them are newline tokens" in caption, caption
        else:
            assert "> budget" not in caption, caption

    # a row over its budget with newline tokens: the card and the table say so
    over = comp.rows[1]
    over.kept, over.newlines_kept = BUDGET + 24, 24
    answers, cards, table, df, raw, status = render_outputs(session, comp)
    assert f"kept {BUDGET + 24} > budget {BUDGET}: 24 of them are newline tokens" in cards[1][1]
    assert table[1][2].endswith(f"(budget {BUDGET}; 24 newline tokens)")


def test_mqt_tokens_are_shown_as_a_note_not_a_dark_image(sessions, scenes):
    """MQT's visual tokens are learned queries with no place on the image: every card (the unpruned one too) shows
    the image undimmed with a note, not an image dimmed as if every token had been dropped."""
    import numpy as np

    import vlprune
    from vlprune_app.ui import render_outputs

    image, question, _ = scenes[0]
    pil = _pil(image)
    session = sessions("proxy-mqt")
    comp = session.compare(pil, question, [("pool", vlprune.get_method("pool", keep=BUDGET))], max_new_tokens=1,
                           repeats=1)
    assert [r.placed for r in comp.rows] == [False, False]
    answers, cards, table, df, raw, status = render_outputs(session, comp)
    bright = np.asarray(pil.convert("L"), dtype=np.float32).mean()
    for (pic, caption), r in zip(cards, comp.rows):
        top = np.asarray(pic.convert("L"), dtype=np.float32)[40:300].mean()  # under the title: the picture
        assert top > 0.8 * bright, (r.name, top, bright)
    plain = sessions("proxy").compare(pil, question, [], max_new_tokens=1, repeats=1)
    assert plain.rows[0].placed  # patch tokens are drawn on the image as before


def test_expected_answer_is_cleared_by_an_upload(sessions):
    """An upload (or clearing the image) empties the example's expected answer."""
    from vlprune_app.ui import build_demo

    demo = build_demo(sessions("proxy"), results_dir=ROOT / "results")
    config = demo.get_config_file()
    ids = {c["props"].get("elem_id"): c["id"] for c in config["components"] if c.get("props", {}).get("elem_id")}
    clears = {t[1] for d in config["dependencies"] for t in d["targets"]
              if t[0] == ids["image-in"] and d["outputs"] == [ids["expected"]]}
    assert {"upload", "clear"} <= clears, clears
    for fn in demo.fns.values():
        if any(t[0] == ids["image-in"] and t[1] == "upload" for t in fn.targets):
            assert fn.fn() == ""


def test_harness_tab_opens_on_the_default_run(tmp_path):
    """results/<model>-default comes first (the tab's opening choice) even when another run is newer."""
    from vlprune_app.results import find_runs

    old = _harness_folder(tmp_path, "proxy-default", dict(meta=dict(model="proxy"), results=[]))
    new = _harness_folder(tmp_path, "tokens-proxy", dict(meta=dict(model="proxy"), results=[]))
    other = _harness_folder(tmp_path, "llm-proxy", dict(meta=dict(model="proxy"), results=[]))
    now = time.time()
    for folder, age in ((old, 300), (new, 0), (other, 100)):
        os.utime(folder / "results.json", (now - age, now - age))
    assert [r.name for r in find_runs(tmp_path, "proxy")] == ["proxy-default", "tokens-proxy", "llm-proxy"]


def test_registry_methods_offered(server):
    """The /run endpoint offers every method registered in this process (the list is built from the registry)."""
    import vlprune

    info = server.client().view_api(print_info=False, return_format="dict")
    assert list(info["named_endpoints"]) == ["/run"], "only /run may be public; the other events are private"
    params = {p["parameter_name"]: p for p in info["named_endpoints"]["/run"]["parameters"]}
    assert set(params) == {"image", "question", "methods", "budget", "params", "max_new_tokens", "repeats"}
    offered = json.dumps(params["methods"]["type"])
    for name in vlprune.list_methods():
        assert f'"{name}"' in offered, f"method {name} is registered but not offered by the demo: {offered}"


@pytest.mark.parametrize("method", ["random", "pool", "cls_attn", "fastv"])
def test_one_method_per_request(server, scenes, method):
    image, question, _ = scenes[0]
    out = _run(server.client(), image, question, [method])
    answers, gallery, table, plot, raw, status = out
    rows = raw["rows"]
    assert [r["name"] for r in rows] == ["unpruned", method]
    base, row = rows
    assert row["error"] is None, row["error"]
    assert base["visual_tokens"] == row["visual_tokens"] == 576
    assert base["kept"] == 576 and base["visual_per_layer"] == [576] * len(base["visual_per_layer"])
    assert 0 < row["kept"] <= BUDGET
    assert row["tflops_prefill"] < base["tflops_prefill"]
    assert row["prefill_ms"] > 0 and row["e2e_ms"] > 0 and base["prefill_ms"] > 0
    assert row["answer"] and base["answer"]
    assert answers.splitlines() == [f"unpruned: {base['answer']}", f"{method}: {row['answer']}"]
    assert len(gallery) == 2 and all(g["image"]["path"] for g in gallery)
    assert [r[0] for r in table["data"]] == ["unpruned", method]
    layers = {(d[2], d[0]): d[1] for d in plot["data"]}
    assert layers[(method, str(len(row["visual_per_layer"]) - 1))] == row["kept"]  # whole layers, as labels
    assert row["merged"] == (method == "pool")
    if method == "fastv":  # pruned inside the decoder at layer k=2: all tokens enter, the budget leaves
        assert row["visual_per_layer"][:2] == [576, 576] and row["visual_per_layer"][2] == BUDGET
    else:  # pruned before the decoder
        assert row["visual_per_layer"][0] == row["kept"]
    assert "Ran the unpruned model" in status
    SEQUENTIAL[method] = (image, question, _summary(raw))


def test_advanced_hyperparameters_reach_the_method(server, scenes):
    """A hyperparameter changed in the advanced section (sent as JSON) reaches the method: FastV at layer 3."""
    image, question, _ = scenes[0]
    raw = _raw(_run(server.client(), image, question, ["fastv"], params=json.dumps({"fastv": {"k": 3}})))
    row = raw["rows"][1]
    assert row["params"]["k"] == 3, row["params"]
    assert row["visual_per_layer"][:3] == [576] * 3 and row["visual_per_layer"][3] == BUDGET
    with pytest.raises(Exception, match="fastv: k must be"):
        _run(server.client(), image, question, ["fastv"], params=json.dumps({"fastv": {"k": 0}}))
    with pytest.raises(Exception, match="no hyperparameter 'nope'"):
        _run(server.client(), image, question, ["pool"], params=json.dumps({"pool": {"nope": 1}}))


def test_concurrent_requests_equal_sequential_runs(server, scenes):
    """Two users at once, different methods and images: each gets its own methods' results, equal to sequential
    runs, and the two requests never held the model at the same time."""
    (img_a, q_a, _), (img_b, q_b, _) = scenes
    seq_a = _raw(_run(server.client(), img_a, q_a, ["pool"]))
    seq_b = _raw(_run(server.client(), img_b, q_b, ["fastv"]))
    client_a, client_b = server.client(), server.client()
    barrier = threading.Barrier(2)
    jobs = {}

    def submit(key, client, img, q, methods):
        barrier.wait()
        jobs[key] = _run(client, img, q, methods, job=True)

    threads = [threading.Thread(target=submit, args=("a", client_a, img_a, q_a, ["pool"])),
               threading.Thread(target=submit, args=("b", client_b, img_b, q_b, ["fastv"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    con_a, con_b = _raw(jobs["a"].result(timeout=120)), _raw(jobs["b"].result(timeout=120))
    assert [r["name"] for r in con_a["rows"]] == ["unpruned", "pool"]
    assert [r["name"] for r in con_b["rows"]] == ["unpruned", "fastv"]
    assert _summary(con_a) == _summary(seq_a)
    assert _summary(con_b) == _summary(seq_b)
    for con, seq in ((con_a, seq_a), (con_b, seq_b)):  # same schedules too: no leaked or foreign patch
        assert [r["visual_per_layer"] for r in con["rows"]] == [r["visual_per_layer"] for r in seq["rows"]]
    first, second = sorted((con_a, con_b), key=lambda r: r["started_at"])
    assert first["finished_at"] <= second["started_at"], "two requests held the model at the same time"
    # the second request queued behind the first (in Gradio's queue): it says how long it waited
    assert second["waited_s"] >= 0.8 * first["ran_s"], (second["waited_s"], first["ran_s"])
    if "pool" in SEQUENTIAL and SEQUENTIAL["pool"][0] == img_a:  # also equal to the one-request-per-method runs
        assert _summary(con_a) == SEQUENTIAL["pool"][2]


def _refusals(server) -> list[str]:
    return [ln for ln in server.log.read_text(errors="replace").splitlines() if ln.startswith("[app] refused input:")]


def test_bad_uploads_get_clear_messages_and_server_keeps_serving(server, scenes, tmp_path):
    from PIL import Image

    image, question, _ = scenes[0]
    client = server.client()
    logged = len(_refusals(server))
    bad = tmp_path / "not_an_image.png"
    bad.write_text("this is text, not a PNG")
    with pytest.raises(Exception, match=r"Could not read not_an_image\.png as an image"):
        _run(client, str(bad), question, ["pool"])
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(image).read_bytes()[:300])
    with pytest.raises(Exception, match=r"Could not read truncated\.png as an image"):
        _run(client, str(truncated), question, ["pool"])
    wide = tmp_path / "wide.png"
    Image.new("RGB", (MAX_SIDE + 500, 40), (200, 30, 30)).save(wide)
    assert wide.stat().st_size < MAX_BYTES
    with pytest.raises(Exception, match=rf"{MAX_SIDE + 500}x40 px.*at most {MAX_SIDE} px per side"):
        _run(client, str(wide), question, ["pool"])
    big = tmp_path / "big.png"
    big.write_bytes(Path(image).read_bytes() + os.urandom(MAX_BYTES))  # a valid PNG with trailing bytes
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the client checks the limit itself
        _run(client, str(big), question, ["pool"])
    # ... and the server refuses it too when the client does not check
    import httpx

    with open(big, "rb") as f:
        r = httpx.post(server.url + "gradio_api/upload", files=[("files", ("big.png", f, "image/png"))], timeout=30)
    assert r.status_code == 413, (r.status_code, r.text[:200])
    assert "File size exceeded" in r.text or "maximum allowed size" in r.text, r.text[:200]
    with pytest.raises(Exception, match="Pick at least one method"):
        _run(client, image, question, [])
    with pytest.raises(Exception, match="budget must be"):
        _run(client, image, question, ["pool"], budget=-3)
    with pytest.raises(Exception, match="Type a question"):
        _run(client, image, "   ", ["pool"])
    with pytest.raises(Exception, match=r"Invalid settings: budget 1\.5 .*e\.g\. 1 or 2\)"):
        _run(client, image, question, ["pool"], budget=1.5)
    assert server.alive()
    # one line in the server log per refused input (the 413 upload never reaches the app), no tracebacks
    refused = _refusals(server)[logged:]
    assert len(refused) == 7, refused
    assert [r.split(": ")[1] for r in refused] == ["Unreadable image", "Unreadable image", "Image too large",
                                                    "No method", "Invalid settings", "No question",
                                                    "Invalid settings"], refused
    assert "Traceback" not in server.log.read_text(errors="replace")
    raw = _raw(_run(client, image, question, ["random"]))  # still serving, with correct results
    assert raw["rows"][1]["kept"] == BUDGET and raw["rows"][1]["error"] is None


def test_harness_results_tab(server):
    """The second tab shows the harness results written for the loaded model (results/proxy-default)."""
    with urllib.request.urlopen(server.url + "config", timeout=10) as r:
        config = json.loads(r.read())
    by_id = {c.get("props", {}).get("elem_id"): c for c in config["components"] if c.get("props", {}).get("elem_id")}
    runs = json.loads((ROOT / "results" / "proxy-default" / "results.json").read_text())
    assert "harness-caption" in by_id, "no harness results shown although results/proxy-default exists"
    assert by_id["harness-run"]["props"]["value"] == "proxy-default", "the tab opens on the default run"
    assert "results/proxy-default" in by_id["harness-caption"]["props"]["value"]
    assert "model `proxy`" in by_id["harness-caption"]["props"]["value"]
    assert "proxy-default" in json.dumps(by_id["harness-run"]["props"]["choices"])
    table = by_id["harness-table"]["props"]["value"]["data"]
    assert len(table) >= len(runs["results"]) or len(table) > 0
    assert table[0][0] == "blind (question only)"
    headers = by_id["harness-table"]["props"]["value"]["headers"]
    assert "accuracy % [95% CI]" in headers and "vs random, same keep" in headers


def _harness_folder(root, name, data):
    folder = root / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(data))
    return folder


def test_harness_table_shows_blind_row_and_intervals(tmp_path):
    """A results.json with the blind baseline and the paired comparisons: the blind row first, every accuracy
    with its interval, 'no difference' inside the noise, a verdict beyond it."""
    from vlprune_app.results import find_runs

    def cmp(diff, ci, p, verdict, ref):
        return dict(diff=diff, ci=ci, p=p, a_only=0, b_only=0, n=200, verdict=verdict, reference=ref)

    rows = [dict(config="unpruned", method="unpruned", keep=None, n=200, accuracy=61.5, accuracy_ci=[54.6, 68.0],
                 agreement=100.0, vs_unpruned=None, vs_random=None),
            dict(config="random@64", method="random", keep=64, n=200, accuracy=48.0, accuracy_ci=[41.2, 54.9],
                 agreement=70.0, vs_unpruned=cmp(-13.5, [-19.0, -8.0], 1e-5, "worse", "unpruned"), vs_random=None),
            dict(config="pool@64", method="pool", keep=64, n=200, accuracy=49.5, accuracy_ci=[42.6, 56.4],
                 agreement=72.0, vs_unpruned=cmp(-12.0, [-17.1, -6.9], 1e-4, "worse", "unpruned"),
                 vs_random=cmp(1.5, [-3.0, 6.0], 0.6, "no difference", "random@64")),
            dict(config="fastv@64", method="fastv", keep=64, n=200, accuracy=56.0, accuracy_ci=[49.1, 62.7],
                 agreement=80.0, vs_unpruned=cmp(-5.5, [-9.9, -1.1], 0.02, "worse", "unpruned"),
                 vs_random=cmp(8.0, [2.1, 13.9], 0.004, "better", "random@64"))]
    blind = dict(method="blind (question only)", accuracy=25.5, overall=25.5, correct=51, n=200,
                 accuracy_ci=[19.9, 31.9], families={"text": 9.1}, chance={"text": 10.0}, n_train=3000)
    _harness_folder(tmp_path, "new", dict(meta=dict(model="proxy", proxy=True, n=200), blind=blind, results=rows))
    (run,) = find_runs(tmp_path, "proxy")
    head, table = run.table()
    col = {h: i for i, h in enumerate(head)}
    assert table[0][:3] == ["blind (question only)", "-", "25.5 [19.9, 31.9]"]
    by = {r[0]: r for r in table}
    assert by["unpruned"][col["accuracy % [95% CI]"]] == "61.5 [54.6, 68.0]"
    assert by["random"][col["vs unpruned [95% CI]"]] == "-13.5 [-19.0, -8.0]"
    assert by["random"][col["vs random, same keep"]] == "-"
    assert by["pool"][col["vs random, same keep"]] == "no difference (p=0.6)"
    assert by["pool"][col["vs unpruned [95% CI]"]] == "-12.0 [-17.1, -6.9]"
    assert by["fastv"][col["vs random, same keep"]] == "better: +8.0 [+2.1, +13.9], p=0.004"
    assert "3000 training samples" in run.caption() and "95% Wilson" in run.caption()


def test_harness_table_reads_results_written_before_the_intervals(tmp_path):
    """results.json files without ``blind``, ``accuracy_ci`` or the comparisons still load: those cells say n/a."""
    from vlprune_app.results import find_runs

    rows = [dict(config="unpruned", method="unpruned", keep=None, n=200, accuracy=50.0, agreement=100.0),
            dict(config="pool@64", method="pool", keep=64, n=200, accuracy=40.5, agreement=72.0)]
    _harness_folder(tmp_path, "old", dict(meta=dict(model="proxy", command="vlprune eval --n 200"), results=rows))
    (run,) = find_runs(tmp_path, "proxy")
    head, table = run.table()
    assert table[0] == ["blind (question only)", "-", "n/a"] + ["-"] * (len(head) - 3)
    assert table[1][2] == "50.0 [n/a]" and table[2][2] == "40.5 [n/a]"
    assert table[2][3:5] == ["n/a", "n/a"]
    assert "n/a" in run.caption()


def _screenshots_module():
    """docs/screenshots.py (the script that writes the README's pictures), loaded from its path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vlprune_docs_screenshots", ROOT / "docs" / "screenshots.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_browser_click_runs_a_comparison(request, scenes, tmp_path):
    """Headless Chromium, as docs/screenshots.py drives it: load the page, pick an example (it fills in the expected
    answer), upload a scene (which clears it), type the question, click Compare, wait for the answers; screenshots
    go to a temporary folder only (docs/screenshots.py writes the committed ones)."""
    pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.common.exceptions import WebDriverException

    shots = _screenshots_module()
    browser, driver_path = shots.chromium()
    if browser is None or driver_path is None:
        pytest.skip(f"headless browser test needs Debian's chromium and chromium-driver (apt-get install chromium "
                    f"chromium-driver); found chromium={browser}, chromedriver={driver_path}")
    server = request.getfixturevalue("server")  # only once the browser is known to exist
    tracked = {p: p.stat().st_mtime for p in (ROOT / "docs").glob("*.png")}
    try:
        driver = shots.start_driver(1400)
    except WebDriverException as e:
        pytest.skip(f"chromium could not be started here: {str(e).splitlines()[0]}")
    shot = tmp_path / "demo.png"
    try:
        image, question, _ = scenes[1]
        seen = shots.compare_in_browser(driver, server.url, image, question)
        assert seen["expected_after_example"], "clicking an example shows its expected answer"
        assert seen["expected_after_upload"] == "", seen  # an upload is not that example any more
        assert [ln.split(":")[0] for ln in seen["answers"]] == ["unpruned", "pool", "cls_attn", "fastv"], seen
        shots.save_page(driver, shot)
    except Exception:
        driver.save_screenshot(str(tmp_path / "demo-failure.png"))
        raise
    finally:
        driver.quit()
    assert shot.exists() and shot.stat().st_size > 10_000
    assert {p: p.stat().st_mtime for p in (ROOT / "docs").glob("*.png")} == tracked, "the test rewrote docs/"
