"""vlprune's Gradio demo: compression methods side by side on one image and question.

    python app.py                          # the shipped proxy LVLM (LLaVA-1.5 geometry), offline, on 127.0.0.1:7860
    python app.py --model proxy-next       # the AnyRes (LLaVA-NeXT) proxy
    python app.py --model llava-hf/llava-1.5-7b-hf --dtype bfloat16   # a hub id (from the local cache) or a folder

Per method: the answer, the kept tokens on the image (merged regions for merging methods), visual tokens per
decoder layer, TFLOPs and measured prefill / end-to-end times, beside the unpruned model; a second tab shows the
harness's accuracy-against-TFLOPs results for the loaded model. Needs the ``app`` extra (gradio). Code:
``vlprune_app/`` (engine.py: the shared model and its lock; ui.py: the interface; overlay.py: the drawings).
"""
from __future__ import annotations

import os

# before gradio / huggingface_hub are imported: no analytics, no telemetry, no hub calls, localhost not proxied
for _k, _v in {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(tempfile.gettempdir()) / "vlprune_app_gradio"))


def _model(text: str) -> str:
    from evals.models import check_model_name

    try:
        check_model_name(text, "--model ")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parse_args(argv=None) -> argparse.Namespace:
    from vlprune.cliargs import Parser, device_name, positive_int as _positive_int
    from vlprune.precision import DTYPES

    ap = Parser(prog="python app.py", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="proxy", type=_model,
                    help="'proxy' (default: the shipped LLaVA-1.5-geometry proxy), 'proxy-next' (AnyRes proxy), "
                         "'proxy-mqt' (the proxy with an MQT projector), a local folder or a hub id of a transformers LLaVA / LLaVA-NeXT model")
    ap.add_argument("--port", type=_positive_int, default=None,
                    help="port (default: $GRADIO_SERVER_PORT or the first free one from 7860)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1; anything public needs a proxy with auth)")
    ap.add_argument("--max-upload-bytes", type=_positive_int, default=10 * 2 ** 20,
                    help="largest upload in bytes (default 10 MiB)")
    ap.add_argument("--max-image-side", type=_positive_int, default=4096,
                    help="longest image side in pixels (default 4096)")
    ap.add_argument("--max-image-pixels", type=_positive_int, default=4096 * 4096,
                    help="most pixels in an image (default 4096x4096)")
    ap.add_argument("--results", default=str(ROOT / "results"),
                    help="folder with the harness's results (*/results.json; default results/)")
    ap.add_argument("--dtype", default="auto", choices=list(DTYPES),
                    help="model dtype; auto (default): bfloat16 where the device computes it natively, else float32")
    ap.add_argument("--device", default="cpu", type=device_name, help="torch device: cpu (default), cuda or cuda:N")
    ap.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--max-new-tokens", type=_positive_int, default=None,
                    help="default answer length (default 4 for the proxy, 32 otherwise)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up generate at start-up")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("python app.py: error: the demo needs gradio; install the app extra: pip install -e '.[app]'",
              file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass
    from vlprune_app.engine import Session, load_model
    from vlprune_app.ui import Limits, build_demo, launch_kwargs

    try:
        limits = Limits(args.max_upload_bytes, args.max_image_side, args.max_image_pixels)
        from vlprune.precision import auto_dtype

        device = "cpu" if args.device == "auto" else args.device
        dtype, why = auto_dtype(args.dtype, device)
        dtype = str(dtype).replace("torch.", "")
        print(f"[app] loading {args.model} in {dtype} ({why}) ...", flush=True)
        model, processor = load_model(args.model, dtype=dtype, device=device)
    except (ValueError, FileNotFoundError) as e:
        print(f"python app.py: error: {e}", file=sys.stderr)
        return 2
    session = Session(model, processor, args.model, max_new_tokens=args.max_new_tokens)
    if not args.no_warmup:
        session.warm_up()
    demo = build_demo(session, results_dir=args.results, limits=limits)
    print(f"[app] {session.description}; uploads: {limits.describe()}", flush=True)
    demo.launch(**launch_kwargs(limits, port=args.port, host=args.host))
    return 0


if __name__ == "__main__":
    sys.exit(main())
