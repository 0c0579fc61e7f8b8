"""Oracle features: train the proxy's projector and decoder on perfect patch features instead of the tower's.

``python -m evals.proxy.oracle --steps 600`` runs stage A (the recipe of ``evals.proxy.train``, vision tower
frozen and unused) with the projector reading, for every patch, a fixed linear map of its true class (one-hot:
background, object kind, digit, sign plate; ``scenes.patch_labels``) and of its 2-D sin-cos position, in place of
the tower's feature layer. It bounds what a better vision tower can buy: the accuracy this run reaches after N
steps is what the same decoder recipe reaches from tokens that carry everything the questions need. Each
evaluation also logs ``separation`` (``class_separation``): per decoder layer, the percentage of object patches
whose state is still nearest to its own class. It is a diagnostic; it writes no weights.

``--embed-std S`` redraws the decoder's token embeddings from N(0, S^2) before training (0: the config's init,
``initializer_range`` = 0.02); ``--projector-scale F`` multiplies the projector's output layer by F
(``train.scale_projector``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch

from . import model as pm
from . import train as T
from .scenes import N_PATCH_CLASSES, patch_labels

__all__ = ["OracleFeatures", "evaluate_oracle", "class_separation", "main"]


class OracleFeatures:
    """A forward pre-hook on the projector of a LLaVA proxy that replaces its input (the tower's patch features)
    with ``(one_hot(class) * 2 ++ sincos(row, col)) @ M`` for the patch classes set by :meth:`set`, ``M`` a fixed
    map with orthogonal rows drawn from ``seed``. ``remove()`` takes the hook off."""

    def __init__(self, model, seed: int = 1, quarter: int = 12):
        grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
        width = model.config.vision_config.hidden_size
        self.positions = T.sincos_grid(grid, quarter)                                    # (grid^2, 4 quarter)
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(width, N_PATCH_CLASSES + 4 * quarter, generator=g))
        self.map = q.T * math.sqrt(width / 8)
        self.labels = None
        self._handle = model.model.multi_modal_projector.register_forward_pre_hook(self._hook)

    def set(self, labels: torch.Tensor) -> None:
        """The (images, patches) int patch classes of the images of the next forward pass."""
        self.labels = labels

    def features(self, labels: torch.Tensor) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(labels.long(), N_PATCH_CLASSES).float() * 2
        pos = self.positions.expand(labels.shape[0], -1, -1)
        return torch.cat([onehot, pos], -1) @ self.map

    def _hook(self, module, args):
        if self.labels is None:
            raise RuntimeError("OracleFeatures: no patch labels set for this forward pass; call .set(labels) first")
        x = args[0]
        if x.shape[:2] != self.labels.shape:
            raise ValueError(f"OracleFeatures: labels {tuple(self.labels.shape)} do not match the projector input "
                             f"{tuple(x.shape)}; set one row of patch classes per image")
        return (self.features(self.labels).to(x.device, x.dtype),)

    def remove(self) -> None:
        self._handle.remove()


def evaluate_oracle(model, processor, oracle: OracleFeatures, n: int = 240, batch_size: int = 40) -> dict:
    """Accuracy on the first ``n`` validation samples, the projector reading their oracle features."""
    from .evaluate import answer, samples, summarize

    model.eval()
    records = []
    items = samples("validation", n)
    for i in range(0, len(items), batch_size):
        batch = items[i:i + batch_size]
        oracle.set(torch.from_numpy(np.stack([patch_labels(s.scene).reshape(-1) for s in batch])))
        with torch.inference_mode():
            preds = answer(model, processor, batch)
        records += [dict(family=s.family, category=s.category, correct=p == s.answer) for s, p in zip(batch, preds)]
    out = summarize(records)
    return {k: out[k] for k in ("overall", "families")}


def class_separation(model, processor, oracle: OracleFeatures, n: int = 6, step: int = 10_000) -> dict:
    """How much of each object patch's class the decoder's image-token states carry, layer by layer: for ``n``
    training-split scenes (those of step ``step`` of the data stream), the percentage of object patches whose state
    is nearer to the mean state of its own patch class than to that of any other class present. Keys: 0 the
    embeddings (the projector's output), k the output of decoder layer k (the last one after the final norm). At
    initialisation the embeddings separate the oracle classes (about 90%); a fall across the layers means the
    decoder writes over the image tokens' content before its heads read it."""
    was = model.training
    model.eval()
    batch = T.make_batch(processor, "llava", n, 0, step, 1)
    labels = batch.pop("patch_labels").reshape(-1)
    for k in ("present", "n_objects", "ground", "answer_at", "labels"):
        batch.pop(k)
    oracle.set(labels.view(n, -1))
    with torch.inference_mode():
        states = model(**batch, output_hidden_states=True, use_cache=False).hidden_states
    img = batch["input_ids"] == model.config.image_token_id
    obj = labels > 0
    classes = torch.unique(labels[obj])
    out = {}
    for layer, h in enumerate(states):
        x = h[img].float()
        means = torch.stack([x[labels == c].mean(0) for c in classes])
        nearest = classes[torch.cdist(x[obj], means).argmin(1)]
        out[layer] = round(100.0 * float((nearest == labels[obj]).float().mean()), 1)
    if was:
        model.train()
    return out


def main(argv=None) -> int:
    from vlprune.cliargs import Parser, device_name, nonneg_int, positive_float, positive_int

    ap = Parser(prog="python -m evals.proxy.oracle", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=positive_int, default=600, help="stage A optimizer steps")
    ap.add_argument("--batch-size", type=positive_int, default=6)
    ap.add_argument("--turns", type=positive_int, default=16)
    ap.add_argument("--lr", type=positive_float, default=6e-4)
    T.add_decoder_init_args(ap)
    ap.add_argument("--eval-n", type=nonneg_int, default=240, help="validation samples per evaluation")
    ap.add_argument("--eval-every", type=nonneg_int, default=300)
    ap.add_argument("--seed", type=nonneg_int, default=0)
    ap.add_argument("--threads", type=nonneg_int, default=0, help="torch threads on CPU (0: all cores)")
    ap.add_argument("--log", default=None, help="also append the JSON log lines to this file")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps {args.steps} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    logf = open(args.log, "a") if args.log else None

    def log(msg):
        print(msg, flush=True)
        if logf:
            logf.write(msg + "\n")
            logf.flush()

    log(json.dumps(dict(command="python -m evals.proxy.oracle " + " ".join(argv if argv is not None else sys.argv[1:]),
                        args=vars(args), torch=torch.__version__, threads=torch.get_num_threads())))
    tok = pm.build_tokenizer()
    proc = pm.build_processor("llava", tok)
    model = pm.build_model("llava", seed=args.seed)
    oracle = OracleFeatures(model)
    T.apply_decoder_init(model, args)
    T.train_stage(model, proc, "llava", args.steps, args.batch_size, args.lr, args.seed, torch.device("cpu"),
                  False, 0, args.turns, log, eval_every=args.eval_every,
                  eval_fn=(lambda m: dict(evaluate_oracle(m, proc, oracle, args.eval_n),
                                          separation=class_separation(m, proc, oracle))) if args.eval_n else None,
                  heads=T.AuxHeads(model.config.vision_config.hidden_size), freeze_vision=True,
                  on_batch=lambda batch, aux: oracle.set(aux["patch_labels"]))
    oracle.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
