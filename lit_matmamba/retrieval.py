"""Adaptive retrieval: queries embedded by one width, searched in a database embedded by another.

::

    python main.py retrieval --ckpt_path CKPT                    # every (query width, database width)
    python main.py retrieval --queries val_w16.pt --database train_w128.pt   # one pair of `embed` files

MatMamba's sub-models write one residual stream of ``d_model`` channels, so their features share one
space; the paper's adaptive retrieval embeds a database once with the full model and searches it
with queries embedded by a smaller sub-model. With a checkpoint this command embeds the query split
(val) and the database split (train) at every granularity (`lit_matmamba.embed`), then evaluates
every pair; the table is printed, and drawn as two heat-maps (top-1, mAP@k) in TensorBoard.

Similarity: cosine, the inner product of L2-normalised features. Search is exact, by plain matrix
products in PyTorch (in blocks of queries), or with ``search="faiss"`` by FAISS's exact
inner-product index (``IndexFlatIP``; ``pip install 'lit-matmamba[retrieval]'`` installs faiss-cpu);
both give the same neighbours (ties aside). PyTorch is the default because on the project's 2-core
machine FAISS's exact search was no faster, from 55,000 to 1,000,000 database rows; an approximate
index would be faster, but would change the numbers this command is for.

Metrics, with "relevant" meaning "of the query's label":

- top-1: the fraction of queries whose nearest database item is relevant (1-nearest-neighbour
  accuracy);
- mAP@k: the mean over queries of AP@k = (1 / min(k, R)) * sum over i <= k of P@i * rel(i), where
  rel(i) is 1 when the i-th neighbour is relevant, P@i is the fraction of relevant items among the
  first i, and R is the number of relevant items in the database (AP@k = 0 when R = 0). When every
  label has k or more database items, as in a class-labelled database, min(k, R) = k and this is
  the mAP@k of Matryoshka Representation Learning's retrieval code (which divides by k).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lit_matmamba.deploy.common import pick_device
from lit_matmamba.embed import (
    Embeddings,
    check_output,
    data_module,
    embed_split,
    load,
    load_embeddings,
    run_command,
    save_atomic,
    width_label,
)
from lit_matmamba.models.config import Width

Search = Literal["torch", "faiss"]
# Scores held at once by the PyTorch search (128 MiB): (queries in a block) x (database rows).
_TORCH_BLOCK_SCORES = 1 << 25


def _check_search(search: str) -> None:
    if search not in ("torch", "faiss"):
        raise ValueError(f"search must be torch or faiss, got {search!r}")
    if search == "faiss":
        import importlib.util

        if importlib.util.find_spec("faiss") is None:
            raise ImportError("search=faiss needs FAISS: pip install 'lit-matmamba[retrieval]' (faiss-cpu)")


def nearest(queries: torch.Tensor, database: torch.Tensor, k: int, search: Search = "torch") -> torch.Tensor:
    """The indices (Q, min(k, N)) of the most similar database rows of each query, most similar
    first, by inner product: queries (Q, d), database (N, d), both L2-normalised for cosine.

    search: "torch" (matrix products in blocks of queries) or "faiss" (``faiss.IndexFlatIP``);
    both exact.
    """
    _check_search(search)
    k = min(k, len(database))
    if search == "faiss":
        import faiss

        index = faiss.IndexFlatIP(database.shape[1])
        index.add(database.float().contiguous().numpy())
        _, found = index.search(queries.float().contiguous().numpy(), k)  # (Q, k)
        return torch.from_numpy(found).long()
    block = max(1, _TORCH_BLOCK_SCORES // max(1, len(database)))
    out = []
    for start in range(0, len(queries), block):
        scores = queries[start : start + block] @ database.T  # (block, N)
        out.append(scores.topk(k, dim=1).indices)
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long)


def retrieval_metrics(
    neighbors: torch.Tensor, query_labels: torch.Tensor, database_labels: torch.Tensor, k: int = 10
) -> dict[str, float]:
    """top-1 and mAP@k (defined in the module docstring) of ranked neighbours (Q, >= 1), indices into
    the database, most similar first; only the first k columns count."""
    neighbors = neighbors[:, :k]
    relevant = (database_labels[neighbors] == query_labels[:, None]).float()  # (Q, k')
    ranks = torch.arange(1, relevant.shape[1] + 1, dtype=torch.float32)  # (k',)
    precision = relevant.cumsum(1) / ranks  # P@i, (Q, k')
    labels, counts = torch.unique(database_labels, return_counts=True)
    at = torch.searchsorted(labels, query_labels).clamp(max=len(labels) - 1)
    in_database = torch.where(labels[at] == query_labels, counts[at], 0)  # R per query, (Q,)
    ap = (precision * relevant).sum(1) / in_database.clamp(min=1, max=k)  # numerator 0 when R = 0
    return {"top1": relevant[:, 0].mean().item(), f"map@{k}": ap.mean().item()}


def evaluate(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    database: torch.Tensor,
    database_labels: torch.Tensor,
    k: int = 10,
    search: Search = "torch",
) -> dict[str, float]:
    """top-1 and mAP@k of the queries (Q, d) against the database (N, d) by cosine similarity;
    labels (Q,) and (N,) say what is relevant (same label)."""
    if queries.ndim != 2 or database.ndim != 2:
        raise ValueError(
            f"embeddings must be (rows, dimensions); got queries {tuple(queries.shape)}, "
            f"database {tuple(database.shape)}"
        )
    if queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"the queries have {queries.shape[1]} dimensions and the database {database.shape[1]}: "
            f"embed both with the same model (widths may differ, the model may not)"
        )
    if not len(queries) or not len(database):
        raise ValueError(f"nothing to evaluate: {len(queries)} queries, {len(database)} database rows")
    if len(query_labels) != len(queries) or len(database_labels) != len(database):
        raise ValueError("one label per query and per database row is needed")
    if (query_labels < 0).any() or (database_labels < 0).any():
        raise ValueError(
            "the embeddings have no labels (-1, as text embeddings have): retrieval needs labelled data"
        )
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    q, db = F.normalize(queries.float(), dim=1), F.normalize(database.float(), dim=1)
    return retrieval_metrics(nearest(q, db, k, search), query_labels, database_labels, k)


def grid(
    queries: Embeddings, database: Embeddings, k: int = 10, search: Search = "torch"
) -> dict[str, list[list[float]]]:
    """Every (query width, database width) pair: metric name -> rows (query widths) of columns
    (database widths)."""
    table: dict[str, list[list[float]]] = {}
    for qf in queries.features:
        row = [evaluate(qf, queries.labels, df, database.labels, k, search) for df in database.features]
        for name in row[0]:
            table.setdefault(name, []).append([r[name] for r in row])
    return table


def markdown(table: dict[str, list[list[float]]], labels: Sequence[str]) -> str:
    """One markdown table per metric: rows query widths, columns database widths."""
    out = []
    for name, rows in table.items():
        out.append(f"| {name}: query \\ database | " + " | ".join(labels) + " |")
        out.append("|---" * (len(labels) + 1) + "|")
        out += [f"| {q} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for q, row in zip(labels, rows)]
        out.append("")
    return "\n".join(out)


def run_dir(ckpt_path: str) -> Path:
    """The training run a checkpoint belongs to: ``.../version_N`` for ``.../version_N/checkpoints/x.ckpt``,
    else the checkpoint's folder."""
    folder = Path(ckpt_path).resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def log_to_tensorboard(
    log_dir: str | Path, table: dict[str, list[list[float]]], labels: Sequence[str], step: int, what: str
) -> None:
    """Heat-maps (IMAGES: retrieval/<metric>), the table (TEXT: retrieval/table) and one scalar per
    pair (retrieval/<metric>/q<query width>_db<database width>) at optimizer step ``step``."""
    from torch.utils.tensorboard import SummaryWriter

    from lit_matmamba.plots import heatmap

    with SummaryWriter(str(log_dir)) as writer:
        for name, rows in table.items():
            fig = heatmap(rows, labels, labels, f"retrieval {name}", "database width", "query width")
            writer.add_figure(f"retrieval/{name}", fig, step)  # closes the figure
            for q, row in zip(labels, rows):
                for d, v in zip(labels, row):
                    writer.add_scalar(f"retrieval/{name}/q{q}_db{d}", v, step)
        writer.add_text("retrieval/table", f"{what}\n\n{markdown(table, labels)}", step)


def _write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def retrieval(
    ckpt_path: str | None = None,
    widths: list[int | list[int]] | None = None,
    query_split: str = "val",
    database_split: str = "train",
    queries: str | None = None,
    database: str | None = None,
    k: int = 10,
    search: Search = "torch",
    data_dir: str | None = None,
    data: dict[str, Any] | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    device: str = "auto",
    log_dir: str | None = None,
    output: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Top-1 (1-nearest-neighbour) and mAP@k of queries at one width against a database at another.

    With --ckpt_path: embeds the query split and the database split at every width (default: the
    granularities the checkpoint was trained at) and evaluates every (query width, database width)
    pair; prints the tables and logs them, as heat-maps, to TensorBoard (--log_dir). With --queries
    and --database: evaluates those two files of `embed`. Cosine similarity, exact search; labels
    decide what is relevant (images; text embeddings have none).

    Args:
        ckpt_path: a checkpoint of this project's trainer.
        widths: the widths to compare, e.g. '[128, 64, 32, 16]' or with a Mix'n'Match width
            '[128, [64,32,16,16]]'; default the checkpoint's granularities.
        query_split: the split whose samples are the queries.
        database_split: the split searched.
        queries: instead of a checkpoint: an embedding file of `embed` whose rows are the queries.
        database: with --queries: the embedding file searched.
        k: neighbours per query for mAP@k.
        search: torch (matrix products) or faiss (FAISS's IndexFlatIP; the retrieval extra). Both
            are exact.
        data_dir: the data to read; default: the checkpoint's (its training data module's data_dir).
        data: other arguments of the data module over the checkpoint's, e.g. '{crop_pct: 1.0}'.
        batch_size: samples per batch when embedding; default the checkpoint's data module's.
        num_workers: data loader workers; default the checkpoint's data module's.
        device: where to embed: auto (the GPU if there is one), cpu, cuda, ...
        log_dir: TensorBoard folder of the heat-maps; default the checkpoint's run directory
            (logs/NAME/version_N), so they show beside its training curves.
        output: also write the tables as JSON to this file.
        overwrite: replace an existing output file.
        progress: show progress bars.
    """
    out_path = check_output(output, overwrite) if output else None
    _check_search(search)  # before minutes of embedding
    if (queries is None) != (database is None):
        raise ValueError("give both --queries and --database (embedding files), or neither")
    if queries is not None:
        if ckpt_path is not None or widths is not None:
            raise ValueError("give either --ckpt_path (and --widths) or --queries and --database, not both")
        q, db = load_embeddings(queries), load_embeddings(database)
        metrics = evaluate(q["embeddings"], q["labels"], db["embeddings"], db["labels"], k, search)
        what = f"queries {queries} ({len(q['embeddings'])}), database {database} ({len(db['embeddings'])})"
        print(what)
        print("  ".join(f"{name} {v:.4f}" for name, v in metrics.items()))
        result = {"queries": queries, "database": database, "k": k, **metrics}
        if out_path:
            save_atomic(result, out_path, _write_json)
        return result
    if ckpt_path is None:
        raise ValueError("give --ckpt_path, or --queries and --database (files of `embed`)")
    if query_split == database_split:
        raise ValueError(
            f"queries and database are the same split ({query_split}): every query would find itself"
        )
    model, record = load(ckpt_path)
    chosen: list[Width] = list(record.granularities) if widths is None else list(widths)
    for w in chosen:
        try:
            model.config.resolve(w)
        except ValueError as err:
            raise ValueError(f"--widths {width_label(w)}: {err}") from None
    dm = data_module(model, record, data_dir, data, batch_size, num_workers)
    dev = pick_device(device)
    embedded = {
        split: embed_split(model, dm, split, chosen, device=dev, progress=progress)
        for split in (query_split, database_split)
    }
    q, db = embedded[query_split], embedded[database_split]
    if (q.labels < 0).any():
        raise ValueError("the data have no labels (text): retrieval needs labelled data, e.g. images")
    start = time.perf_counter()
    table = grid(q, db, k, search)
    seconds = time.perf_counter() - start
    labels = [width_label(w) for w in chosen]
    what = (
        f"queries: {query_split} ({len(q.ids)}), database: {database_split} ({len(db.ids)}), "
        f"{q.feature} features, cosine, step {record.global_step}"
    )
    print(f"{what}; {len(chosen) ** 2} searches in {seconds:.1f} s")
    print(markdown(table, labels))
    log_dir = log_dir or str(run_dir(ckpt_path))
    log_to_tensorboard(log_dir, table, labels, record.global_step, what)
    print(f"heat-maps in TensorBoard: tensorboard --logdir {log_dir} (IMAGES, retrieval/*)")
    result = {
        "checkpoint": ckpt_path,
        "widths": labels,
        "query_split": query_split,
        "database_split": database_split,
        "queries": len(q.ids),
        "database": len(db.ids),
        "k": k,
        "search": search,
        **table,
    }
    if out_path:
        save_atomic(result, out_path, _write_json)
    return result


def main(argv: list[str], prog: str = "python main.py retrieval") -> None:
    run_command(retrieval, argv, prog, "\n\n" + __doc__[__doc__.index("Metrics,") :].strip())
