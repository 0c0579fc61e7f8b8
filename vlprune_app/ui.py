"""The Gradio interface: ``build_demo(session, ...)`` returns the Blocks; ``launch_kwargs(...)`` the safe launch.

Tab "Compare": an image (upload, example scenes of the proxy benchmark, CC0 photos), a question, methods and a
budget; one click runs the unpruned model and every chosen method on the shared model and shows, per method, the
answer, the kept tokens on the image (merged regions for merging methods), visual tokens per decoder layer,
TFLOPs and measured prefill and end-to-end times. The advanced section holds every hyperparameter of every
registered method at its default, built from the registry at start-up. Tab "Harness results": the accuracy
against TFLOPs results that ``vlprune eval`` wrote for the loaded model, each accuracy with its 95% interval, the
paired differences to the unpruned model and to random ("no difference" inside the noise) and the blind
(question-only) row.

Concurrency: the only event that touches the model is ``/run`` (queue id "model", limit 1, queue API closed to
direct POSTs), and ``Session.compare`` holds the model lock around apply -> run -> remove. See ``engine.py``.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np
import PIL.Image

from .engine import DEFAULT_REPEATS, Session
from .overlay import card, note_picture, overlay
from .params import changed_values, method_kwargs, method_specs, parse_budget, parse_overrides
from .results import find_runs

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
DEFAULT_METHODS = ("pool", "cls_attn", "fastv")  # pre-ticked when registered; every registered method is listed
MAX_QUESTION = 500
MAX_REPEATS = 10


def refuse(kind: str, message: str) -> gr.Error:
    """The error for a refused input: the user sees "kind: message" (this Gradio shows every toast titled
    "Error", so the kind goes into the text), and the server log gets one line instead of a traceback."""
    text = f"{kind}: {message}"
    print(f"[app] refused input: {' '.join(text.split())}", file=sys.stderr, flush=True)
    return gr.Error(text, print_exception=False)


class Limits:
    """Upload limits: bytes per file and image dimensions (longest side and total pixels)."""

    def __init__(self, max_bytes: int = 10 * 2 ** 20, max_side: int = 4096, max_pixels: int = 4096 * 4096):
        for name, v in (("max_bytes", max_bytes), ("max_side", max_side), ("max_pixels", max_pixels)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"upload limit {name} must be a positive integer; got {v!r}")
        self.max_bytes, self.max_side, self.max_pixels = max_bytes, max_side, max_pixels

    def describe(self) -> str:
        return (f"{self.max_bytes / 2 ** 20:.1f} MiB per file, {self.max_side} px per side, "
                f"{self.max_pixels / 1e6:.1f} megapixels")

    def check(self, img: PIL.Image.Image) -> None:
        w, h = img.size
        if w > self.max_side or h > self.max_side or w * h > self.max_pixels:
            raise refuse("Image too large",
                         f"The image is {w}x{h} px ({w * h / 1e6:.1f} megapixels); this demo accepts at most "
                         f"{self.max_side} px per side and {self.max_pixels / 1e6:.1f} megapixels. Downscale it (the "
                         f"model sees 336 px tiles anyway) and upload it again.")
        if w < 2 or h < 2:
            raise refuse("Image too small", f"The image is {w}x{h} px; give an image of at least 2x2 px.")


def guarded_image(limits: Limits, **kwargs) -> gr.Image:
    """A ``gr.Image`` whose preprocessing turns unreadable, oversized or too large images into a clear message.

    Gradio decodes uploads before the event handler runs, and without this a broken file ends the request with a
    generic error. The guard wraps this one instance's ``preprocess`` (a subclass would make Gradio write a .pyi
    stub next to this module and render it as an unknown component)."""
    image = gr.Image(**kwargs)
    decode = image.preprocess

    def preprocess(payload):
        if payload is None:
            return None
        path = getattr(payload, "path", None)
        name = getattr(payload, "orig_name", None) or (Path(path).name if path else "the upload")
        if path and os.path.exists(path):
            size = os.path.getsize(path)
            if size > limits.max_bytes:
                raise refuse("File too large", f"{name} is {size / 2 ** 20:.1f} MiB; this demo accepts files up to "
                                               f"{limits.max_bytes / 2 ** 20:.1f} MiB. Compress or downscale it.")
        try:
            img = decode(payload)
        except gr.Error as e:  # Gradio's own refusals (SVG files): logged in one line too
            raise refuse("Unsupported image", str(e)) from None
        except PIL.Image.DecompressionBombError as e:
            raise refuse("Image too large", f"{name} has too many pixels ({e}); this demo accepts at most "
                                            f"{limits.max_pixels / 1e6:.1f} megapixels. Downscale it.") from None
        except Exception as e:  # malformed, truncated or not an image at all
            reason = str(e).split("\n")[0]
            if path:
                reason = reason.replace(str(path), name)
            raise refuse("Unreadable image", f"Could not read {name} as an image ({type(e).__name__}: "
                                             f"{reason[:160]}). Upload a PNG, JPEG, WebP, BMP or GIF file.") from None
        if img is not None:
            limits.check(img)
        return img

    image.preprocess = preprocess
    return image


# ------------------------------------------------------------------------------------------------------ examples
def example_rows(session: Session) -> list[list]:
    """[image path, question, expected answer]: proxy-benchmark scenes (rendered from seeds, one per question
    family) and the CC0 photos under assets/."""
    rows = []
    try:
        from evals.proxy.scenes import FAMILIES, make_sample, render, split_seed

        geometry = "next" if session.anyres else "llava"
        folder = Path(tempfile.gettempdir()) / "vlprune_app_examples"
        folder.mkdir(parents=True, exist_ok=True)
        for i, fam in enumerate(FAMILIES):
            s = make_sample(split_seed("test", i), fam, geometry=geometry)
            path = folder / f"scene_{geometry}_{s.seed}_{fam}.png"
            if not path.exists():
                render(s.scene).save(path)
            rows.append([str(path), s.question, f"{s.answer} (proxy scene, {fam})"])
    except Exception:  # the benchmark package is optional for the app; photos still work
        pass
    proxy = session.proxy
    photos = [("chelsea.jpg", "what colour is the object ?" if proxy else "What animal is in the picture?"),
              ("coffee.jpg", "how many objects are there ?" if proxy else "What is in the cup?"),
              ("camera.jpg", "is there a square in the image ?" if proxy else "What is the person holding?")]
    for fname, q in photos:
        p = ASSETS / fname
        if p.exists():
            rows.append([str(p), q, "- (CC0 photo; the proxy knows only coloured shapes)" if proxy else "-"])
    return rows


# ------------------------------------------------------------------------------------------------------ results
def _fmt(v, f):
    return "-" if v is None else format(v, f)


def _title(r) -> str:
    if r.name == "unpruned":
        return "unpruned"
    p = r.params
    b = f"keep={p['keep']}" if p.get("keep") is not None else (
        f"keep_ratio={p['keep_ratio']}" if p.get("keep_ratio") is not None else "")
    extra = f" k={p['k']}" if "k" in p else ""
    return f"{r.name} {b}{extra}".strip()


def budget_note(r) -> str | None:
    """Why a method kept more tokens than the request's budget, from its stats (None when within the budget)."""
    if r.budget is None or r.kept <= r.budget:
        return None
    text = f"kept {r.kept} > budget {r.budget}: "
    image_tokens = r.kept - r.newlines_kept
    if r.newlines_kept:
        text += (f"{r.newlines_kept} of them are newline tokens (one per row of the AnyRes grid), which this "
                 f"method keeps beside its {image_tokens} image tokens")
        if image_tokens > r.budget:
            text += f"; the image tokens exceed the budget by {image_tokens - r.budget} too (the method's own rule)"
    else:
        text += f"the method's own rule keeps {r.kept - r.budget} more than the budget"
    return text + (f" ({'; '.join(r.notes)})" if r.notes else "")


def _picture(session: Session, comp, r, depth, merged_into, display: int):
    if r.placed:
        return overlay(comp.image, comp.layout, session.model.config, session.processor.image_processor, depth,
                       merged_into, display)
    return note_picture(comp.image, [
        f"No place on the image: each of the {r.visual_tokens} visual tokens is a learned query of the projector "
        f"that looks at the whole image (MQT), not an image patch.",
        f"all {r.visual_tokens} are kept" if r.name == "unpruned" else
        f"{r.kept_before_llm} of the {r.visual_tokens} enter the decoder, {r.kept} reach its last layer"
        if r.kept_before_llm != r.kept else f"{r.kept} of the {r.visual_tokens} are kept"], display)


def render_outputs(session: Session, comp, display: int = 448):
    import pandas as pd

    base = comp.rows[0]
    cards, table, answers, lines = [], [], [], []
    for r in comp.rows:
        if r.error:
            answers.append(f"{r.name}: ERROR {r.error}")
            pic = _picture(session, comp, r, np.zeros(comp.visual_tokens, dtype=np.float32), None, display)
            cards.append((card(_title(r), [f"error: {r.error[:70]}"], pic, [], comp.visual_tokens, error=r.error),
                          f"{r.name}: error"))
            table.append([r.name, f"ERROR: {r.error}", "-", "-", "-", "-", "-", "-", "-", "-", r.label])
            continue
        answers.append(f"{r.name}: {r.answer}")
        ratio = (r.tflops_prefill / base.tflops_prefill) if r.tflops_prefill and base.tflops_prefill else None
        pic = _picture(session, comp, r, r.depth, r.merged_into, display)
        kept_txt = f"{r.kept}/{r.visual_tokens}"
        if r.kept_before_llm != r.kept and r.name != "unpruned":
            kept_txt += f" ({r.kept_before_llm} enter the decoder)"
        over = budget_note(r)
        if over:
            kept_txt += f" (budget {r.budget}" + (f"; {r.newlines_kept} newline tokens)" if r.newlines_kept else ")")
        text = [f"answer: {r.answer!r}" + ("" if r.name == "unpruned" else
                                          ("  (same as unpruned)" if r.answer == base.answer else "  (differs)")),
                f"kept {r.kept}/{r.visual_tokens}" + (f" ({r.kept_before_llm} enter the decoder)"
                                                       if r.kept_before_llm != r.kept and r.name != "unpruned" else "")
                + ("  merged" if r.merged else ""),
                f"TFLOPs prefill {_fmt(r.tflops_prefill, '.4f')}" + (f" ({ratio:.2f}x)" if ratio else ""),
                f"prefill {_fmt(r.prefill_ms, '.0f')} ms, end-to-end {_fmt(r.e2e_ms, '.0f')} ms"]
        notes = [n for n in (over, r.timing_note) if n]
        cards.append((card(_title(r), text, pic, r.visual_per_layer, r.visual_tokens, notes=notes),
                      f"{r.name}: {r.answer!r}, kept {r.kept}/{r.visual_tokens}, {_fmt(r.tflops_prefill, '.4f')} "
                      f"TFLOPs, prefill {_fmt(r.prefill_ms, '.0f')} ms, e2e {_fmt(r.e2e_ms, '.0f')} ms"
                      + "".join(f". {n}" for n in notes)))
        prefill_cell = _fmt(r.prefill_ms, ".1f") + (" (slower than e2e: noisy)" if r.timing_note else "")
        table.append([r.name, r.answer, kept_txt, _fmt(r.equivalent_tokens, ".1f"), _fmt(r.tflops_prefill, ".5f"),
                      _fmt(r.tflops_generate, ".5f"), _fmt(ratio, ".2f"), prefill_cell,
                      _fmt(r.e2e_ms, ".1f"), _fmt(r.method_ms, ".2f"), r.label])
        for layer, v in enumerate(r.visual_per_layer):
            lines.append({"layer": str(layer), "visual tokens": v, "method": r.name})
    df = pd.DataFrame(lines if lines else [{"layer": "0", "visual tokens": 0, "method": "unpruned"}])
    raw = {"question": comp.question, "prompt": comp.prompt, "visual_tokens": comp.visual_tokens,
           "model": session.spec, "waited_s": comp.waited_s, "ran_s": comp.ran_s,
           "started_at": comp.started_at, "finished_at": comp.finished_at, "repeats": comp.repeats,
           "timing_order": [list(x) for x in comp.timing_order],
           "rows": [r.as_json() for r in comp.rows]}
    n_err = sum(1 for r in comp.rows if r.error)
    n_slow = sum(1 for r in comp.rows if r.timing_note)
    status = (f"Ran the unpruned model and {len(comp.rows) - 1} method(s) on {comp.visual_tokens} visual tokens in "
              f"{comp.ran_s:.1f} s (waited {comp.waited_s:.1f} s for the shared model). Times: median of "
              f"{comp.repeats} timed run(s) per method, in rounds that take the methods in turn, after one untimed "
              f"pass each, on {session.device}; a shared machine makes them noisy. TFLOPs: vlprune's cost model "
              f"(2 x MACs, whole prefill incl. vision tower)."
              + (f" **{n_slow} method(s) timed a prefill slower than their end-to-end run**: the machine was busy; "
                 f"run again or time more rounds." if n_slow else "")
              + (f" **{n_err} method(s) failed**: see the table." if n_err else ""))
    return "\n".join(answers), cards, table, df, raw, status


# Gallery thumbnails are square by default; the result cards are taller (or, for AnyRes, wider): show them whole.
# Their caption strip would cover the bottom of each card (its per-layer chart); the card holds the same text, so the
# strip is hidden in the grid (the enlarged view still shows it). Narrow windows get fewer, larger cards.
CSS = """
#gallery .thumbnail-item { aspect-ratio: auto !important; height: auto !important; }
#gallery .thumbnail-item > img { height: auto !important; }
#gallery .thumbnail-item .caption-label { display: none !important; }
@media (max-width: 1100px) {
  #gallery .grid-container { grid-template-columns: repeat(2, minmax(100px, 1fr)) !important; }
  #gallery.anyres .grid-container { grid-template-columns: repeat(1, minmax(100px, 1fr)) !important; }
}
"""


def queued_seconds(demo: gr.Blocks, request) -> float:
    """Seconds the running request waited in Gradio's queue before its handler started: another user's request
    holds the model (queue id "model", limit 1) and this one waits in the queue, not at the model lock. Gradio
    stamps each queued event when it joins; the running event is the one that carries this handler's HTTP request.
    0.0 outside a queue (direct calls)."""
    raw = getattr(request, "request", None) if request is not None else None
    queue = getattr(demo, "_queue", None)
    if raw is None or queue is None:
        return 0.0
    try:
        for job in list(getattr(queue, "active_jobs", []) or []):
            for event in job or []:
                if getattr(event, "request", None) is raw:
                    return max(0.0, time.monotonic() - float(event.enqueue_time))
    except Exception:  # another Gradio version: report only the wait at the model lock
        pass
    return 0.0

TABLE_HEADERS = ["method", "answer", "kept / visual", "equiv. tokens", "TFLOPs prefill", "TFLOPs generate",
                 "x unpruned FLOPs", "prefill ms", "e2e ms", "method ms", "hyperparameters"]


# ------------------------------------------------------------------------------------------------------ demo
def build_demo(session: Session, results_dir=None, limits: Limits | None = None) -> gr.Blocks:
    """The Blocks of the demo for a loaded ``Session``. One demo per server (tests build one per test)."""
    limits = limits or Limits()
    PIL.Image.MAX_IMAGE_PIXELS = max(1, limits.max_pixels // 2)  # Pillow refuses above 2x this: decompression bombs
    results_dir = Path(results_dir) if results_dir is not None else ROOT / "results"
    specs = method_specs()
    names = list(specs)
    defaults = [m for m in DEFAULT_METHODS if m in specs] or names[:2]

    def collect(*values):
        out, i = {}, 0
        try:
            for name in names:
                spec = specs[name]
                changed = changed_values(spec, values[i:i + len(spec.params)])
                i += len(spec.params)
                if changed:
                    out[name] = changed
        except ValueError as e:
            raise refuse("Invalid hyperparameter", str(e)) from None
        import json

        return json.dumps(out)

    def run(image, question, methods, budget, params, max_new_tokens, repeats, request: gr.Request = None):
        """Run the unpruned model and each chosen method on one image and question.

        image: the image; question: text; methods: registered method names; budget: visual tokens kept (an
        integer >= 1) or a share in (0, 1); params: JSON {method: {hyperparameter: value}} overriding the defaults
        (a method's own keep / keep_ratio overrides the budget); max_new_tokens: answer length; repeats: timed runs
        per method (median; the rounds interleave the methods; default 3). Returns answers, cards, table, per-layer
        token counts, raw JSON and a status line."""
        import vlprune

        queued = queued_seconds(demo, request)  # first: the checks below are not queueing
        if image is None:
            raise refuse("No image", "Upload an image or pick an example first.")
        if not isinstance(image, PIL.Image.Image):
            raise refuse("No image", f"Expected an image; got {type(image).__name__}.")
        limits.check(image)
        question = (question or "").strip()
        if not question:
            raise refuse("No question", "Type a question about the image.")
        if len(question) > MAX_QUESTION:
            raise refuse("Question too long",
                         f"The question has {len(question)} characters; the limit is {MAX_QUESTION}.")
        methods = [methods] if isinstance(methods, str) else list(methods or [])
        if not methods:
            raise refuse("No method", f"Pick at least one method (registered: {', '.join(names)}).")
        unknown = [m for m in methods if m not in specs]
        if unknown:
            raise refuse("Unknown method", f"Unknown method(s) {unknown}; registered: {', '.join(names)}.")
        methods = list(dict.fromkeys(methods))
        try:
            b = parse_budget(budget)
            overrides = parse_overrides(params, specs)
            built = [(m, vlprune.get_method(m, **method_kwargs(m, specs[m], b, overrides))) for m in methods]
        except (ValueError, TypeError) as e:
            raise refuse("Invalid settings", str(e)) from None
        try:
            new_tokens = int(max_new_tokens) if max_new_tokens else session.default_new_tokens
            reps = int(repeats) if repeats else DEFAULT_REPEATS
        except (TypeError, ValueError):
            raise refuse("Invalid settings", f"max_new_tokens and repeats must be integers; got {max_new_tokens!r}, "
                                             f"{repeats!r}") from None
        if not 1 <= new_tokens <= 256 or not 1 <= reps <= MAX_REPEATS:
            raise refuse("Invalid settings", f"max_new_tokens must be in 1..256 and repeats in 1..{MAX_REPEATS}; got "
                                             f"{new_tokens}, {reps}")
        comp = session.compare(image, question, built, max_new_tokens=new_tokens, repeats=reps,
                               queued_s=queued)
        return render_outputs(session, comp)

    with gr.Blocks(title="vlprune demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# vlprune: visual-token compression, side by side\n"
            f"Model: **{session.description}**. Every method is attached to this one model with hooks for your "
            "request and removed afterwards; requests take turns on the model."
            + ("\n\n*Proxy model: a small LVLM trained here on coloured-shape scenes, under-trained; its answers and "
               "accuracies are proxy figures, indicative only. Photos are outside what it knows.*"
               if session.proxy else ""))
        with gr.Tab("Compare", id="compare"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = guarded_image(limits, label="Image", type="pil", image_mode="RGB",
                                          sources=["upload", "clipboard"], elem_id="image-in", height=320)
                    question = gr.Textbox(label="Question", elem_id="question", lines=1, max_lines=3,
                                          placeholder="e.g. is there a red circle in the image ?")
                    expected = gr.Textbox(label="Expected answer (example scenes)", elem_id="expected",
                                          interactive=False, placeholder="(set by an example; cleared on upload)")
                    gr.Markdown(f"Uploads: at most {limits.describe()}.")
                    rows = example_rows(session)
                    if rows:
                        gr.Examples(examples=rows, inputs=[image, question, expected],
                                    label="Examples: proxy-benchmark scenes and CC0 photos", examples_per_page=5,
                                    elem_id="examples")
                with gr.Column(scale=1):
                    methods = gr.CheckboxGroup(names, value=defaults, label="Methods", elem_id="methods",
                                               info="Every registered method; each runs beside the unpruned model.")
                    budget = gr.Number(value=64, label="Budget: visual tokens to keep (or a share below 1, e.g. 0.25)",
                                       elem_id="budget")
                    run_btn = gr.Button("Compare", variant="primary", elem_id="run-btn")
                    answers = gr.Textbox(label="Answers", elem_id="answers", lines=4, interactive=False)
                    status = gr.Markdown(elem_id="status")
            with gr.Accordion("Advanced: method hyperparameters (defaults from each method's paper)", open=False,
                              elem_id="advanced"):
                with gr.Row():
                    max_new = gr.Slider(1, 64, value=session.default_new_tokens, step=1, label="Max new tokens",
                                        elem_id="max-new-tokens")
                    repeats = gr.Slider(1, MAX_REPEATS, value=DEFAULT_REPEATS, step=1,
                                        label="Timed runs per method (median; rounds interleave the methods)",
                                        elem_id="repeats")
                gr.Markdown("A method's own `keep` / `keep_ratio` replaces the budget above for that method. Empty "
                            "fields mean None.")
                widgets = []
                for name in names:
                    spec = specs[name]
                    with gr.Accordion(f"{name} ({spec.class_name}; stages: {spec.stages})", open=False):
                        if spec.summary:
                            gr.Markdown(spec.summary[:600])
                        with gr.Row():
                            for p in spec.params:
                                label = f"{p.name} ({p.type_text})"
                                eid = f"hp-{name}-{p.name}"
                                if p.widget == "checkbox":
                                    w = gr.Checkbox(value=bool(p.default), label=label, elem_id=eid)
                                elif p.widget == "number":
                                    w = gr.Number(value=p.default, label=label, elem_id=eid,
                                                  precision=0 if p.kind == "int" else None)
                                else:
                                    w = gr.Textbox(value=p.widget_value(), label=label, elem_id=eid,
                                                   placeholder="None" if p.optional else None)
                                widgets.append(w)
                params_json = gr.Textbox(label="Hyperparameters sent with the request (changed from the defaults)",
                                         value="{}", elem_id="params-json", interactive=False)
            gr.Markdown("**Kept tokens on the image the model saw**: bright with a green border, the tokens that "
                        "reached the last decoder layer; the others dimmed by how early they were dropped (dark: "
                        "before the decoder); merging methods tint each merged region in its own colour. Under each "
                        "image: the answer, tokens kept, TFLOPs, times and the visual tokens entering each decoder "
                        "layer. Click a card to enlarge it.")
            gallery = gr.Gallery(label="Kept tokens", show_label=False, elem_id="gallery",
                                 columns=2 if session.anyres else 3, height="auto", object_fit="contain",
                                 format="png", elem_classes=["anyres"] if session.anyres else None)
            table = gr.Dataframe(headers=TABLE_HEADERS, label="Answers, kept tokens, cost and time per method",
                                 elem_id="results", interactive=False, wrap=True)
            # layers as labels in layer order (a numeric axis ticks at 0.2, 0.4, ...); tall enough for the legend
            # under the plot, one entry per method
            plot = gr.LinePlot(x="layer", y="visual tokens", color="method", label="Visual tokens per decoder layer",
                               elem_id="layers-plot", height=None,
                               sort=[str(i) for i in range(session.n_layers)], x_title="decoder layer",
                               y_lim=[0, None], color_title="method")
            with gr.Accordion("Raw results (JSON)", open=False):
                raw = gr.JSON(label="Raw results", elem_id="raw")

            run_btn.click(collect, widgets, params_json, queue=False, api_visibility="private").success(
                run, [image, question, methods, budget, params_json, max_new, repeats],
                [answers, gallery, table, plot, raw, status], api_name="run", concurrency_limit=1,
                concurrency_id="model")
            # an example fills in its expected answer; an upload or a cleared image is not that example any more
            image.upload(lambda: "", None, expected, queue=False, api_visibility="private")
            image.clear(lambda: "", None, expected, queue=False, api_visibility="private")

        with gr.Tab("Harness results", id="harness"):
            runs = find_runs(results_dir, session.spec)
            if not runs:
                gr.Markdown(
                    f"**No harness results for model `{session.spec}`** were found under `{results_dir}` (looked for "
                    f"`*/results.json` whose `meta.model` is `{session.spec}`). Run the harness, then restart the "
                    f"demo:\n\n```\nvlprune eval --model {session.spec} --out {results_dir}/<name>\n```",
                    elem_id="harness-none")
            else:
                by_name = {r.name: r for r in runs}

                def show(name):
                    r = by_name.get(name) or runs[0]
                    png = PIL.Image.open(r.png).convert("RGB") if r.png else None
                    note = "" if r.png else "\n\n(no `accuracy_vs_tflops.png` in this folder; table only)"
                    return r.caption() + note, png, r.table()[1]

                cap0, png0, data0 = show(runs[0].name)  # find_runs puts the model's default run first
                pick = gr.Dropdown([r.name for r in runs], value=runs[0].name, label="Results folder",
                                   elem_id="harness-run", info=f"{len(runs)} run(s) of this model under {results_dir}")
                cap = gr.Markdown(cap0, elem_id="harness-caption")
                fig = gr.Image(png0, label="Accuracy against TFLOPs (from the harness)", elem_id="harness-plot",
                               interactive=False, type="pil")
                tab = gr.Dataframe(value=data0, headers=runs[0].table()[0], label="Harness table",
                                   elem_id="harness-table", interactive=False, wrap=True)
                pick.change(show, pick, [cap, fig, tab], queue=False, api_visibility="private")
    demo.queue(default_concurrency_limit=1, max_size=16, api_open=False)
    return demo


def launch_kwargs(limits: Limits, port: int | None = None, host: str = "127.0.0.1") -> dict:
    """The launch settings of spec/gradio.md: local address, upload limit, no monitoring, no share."""
    return dict(server_name=host, server_port=port, max_file_size=limits.max_bytes, show_error=False,
                enable_monitoring=False, allowed_paths=[], share=False, footer_links=["gradio"], css=CSS)
