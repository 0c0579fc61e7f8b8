"""Functions of a task folder written by ``python -m vlprune_lmms_eval.export`` (copied there as ``utils.py``).

Each document is one line of the folder's ``data.jsonl``: ``image`` (a file name in the folder), ``question``,
``answer`` and ``category``. Scoring is vlprune's harness scoring for JSONL benchmarks: the first line of the
answer, lower-cased, punctuation removed, whitespace collapsed, compared for equality.
"""
import os

from PIL import Image

from evals.benchmarks import normalize

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    path = doc["image"] if os.path.isabs(doc["image"]) else os.path.join(HERE, doc["image"])
    with Image.open(path) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc, results):
    prediction = results[0] if results else ""
    return {"exact_match": float(normalize(prediction) == normalize(str(doc["answer"])))}
