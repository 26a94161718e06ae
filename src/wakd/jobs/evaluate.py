"""eval.py: Recall@N of a checkpoint (or an untrained / raw-pixel model) on one split."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import Subset

from wakd.ann import SearchSpec
from wakd.data.datamodule import split_images
from wakd.data.datasets import PlaceSplit, load_split, split_files
from wakd.data.images import build_transform
from wakd.describe import extract_descriptors
from wakd.distributed import check_shared_run_dir, launcher_process_group
from wakd.eval.plots import pick_examples, plot_attention, plot_recall_curve, plot_retrievals
from wakd.eval.protocol import evaluation_card
from wakd.eval.report import recall_table, write_predictions, write_results
from wakd.eval.retrieval import Retrieval, evaluate_split
from wakd.jobs.cluster import init_netvlad
from wakd.jobs.common import build_net, build_teacher_net, load_dataset_split, model_config_for
from wakd.losses import attention_map
from wakd.models.inference import OnnxDescriptorNet
from wakd.models.pca import PCAWhitening
from wakd.models.place_net import PlaceNet
from wakd.modules.teacher_cache import teacher_targets_of
from wakd.resolvers import file_digest


def is_zoo_model(model: DictConfig) -> bool:
    """A published model (``wakd.zoo``, configs/model/<family>.yaml), not a wakd network."""
    return "zoo_family" in model


def input_rule(cfg: DictConfig) -> dict[str, Any]:
    """How images are resized before description: ``image_size`` (H, W) or None and the
    ``resize`` filter (a published model's own, else the dataset's size, bilinear), and
    ``query_shorter_side`` (``dataset.query_shorter_side``: Tokyo 24/7's queries)."""
    if is_zoo_model(cfg.model):  # its authors' input size and resampling
        size, resize = cfg.model.image_size, cfg.model.resize
    else:
        size, resize = cfg.dataset.image_size, "bilinear"
    side = cfg.dataset.get("query_shorter_side")
    return {
        "image_size": tuple(size) if size else None,
        "resize": resize,
        "query_shorter_side": int(side) if side else None,
    }


def _transform(cfg: DictConfig, queries: bool = False):
    """The database images' transform, or with ``queries`` the queries'. Published models'
    images are decoded in full before resizing, as their authors do."""
    rule = input_rule(cfg)
    size = rule["query_shorter_side"] if queries and rule["query_shorter_side"] else rule["image_size"]
    return build_transform(size, train=False, resize=rule["resize"], draft=not is_zoo_model(cfg.model))


@torch.no_grad()
def descriptor_dim(net: torch.nn.Module, cfg: DictConfig) -> int:
    """The net's descriptor size: its own record, else one forward pass of a grey image at
    the evaluated size (published models: any fixed size they take)."""
    if hasattr(net, "descriptor_dim"):
        return int(net.descriptor_dim)
    size = cfg.model.get("image_size") or cfg.dataset.image_size
    return int(net(torch.full((1, 3, *size), 0.5)).shape[1])


PCA_FIT_CHOICES = ("auto", "train", "database")


def resolve_pca_fit(cfg: DictConfig) -> str:
    """What ``pca_fit`` asks for on this dataset: 'train', 'database' or a PCA file's path.

    'auto' is 'train' (``dataset.pca_source``: the train split, Pitts30k-train for Pitts and
    Tokyo 24/7) where that split exists and otherwise 'database', said in one line, so that
    evaluation-only datasets work with the defaults.
    """
    choice = str(cfg.pca_fit)
    if choice not in PCA_FIT_CHOICES:
        if not Path(choice).is_file():
            raise FileNotFoundError(
                f"pca_fit={choice}: no such PCA file; choose {', '.join(PCA_FIT_CHOICES)} or a "
                "PCA .safetensors file written by eval.py (results.json's pca_file)"
            )
        return choice
    if choice == "database":
        return choice
    source = cfg.dataset.pca_source
    missing = [p for p in split_files(source.kind, source.root, source.split, source.scale) if not p.exists()]
    if not missing:
        return "train"
    if choice == "auto":
        print(
            f"pca_fit=auto: {missing[0]} not found, so PCA is fitted on the database of the "
            f"{cfg.split} split instead (pca_fit=PATH reuses a PCA fitted elsewhere)"
        )
        return "database"
    raise FileNotFoundError(
        f"PCA (pca_fit=train) needs {missing[0]}: pass pca_fit=database, pca_fit=PATH "
        "(a PCA file eval.py wrote) or pca=false"
    )


def pca_cache_path(cfg: DictConfig, source: str, root: str | Path, in_dim: int, out_dim: int) -> Path:
    """Beside the checkpoint, keyed by its hash and the PCA settings (log_dir for untrained nets).

    ``source`` names the fitting images; the digest of their ``root`` keeps apart datasets
    of one kind (two folder-format datasets).
    """
    root_digest = hashlib.sha256(str(Path(root).absolute()).encode()).hexdigest()[:8]
    key = f"{source}-{root_digest}-{in_dim}to{out_dim}-{cfg.pca_max_images}"
    weights = cfg.ckpt or (cfg.model.weights if is_zoo_model(cfg.model) else None)
    if weights:
        ckpt = Path(weights)
        return ckpt.with_name(f"{ckpt.stem}.pca-{file_digest(ckpt)}-{key}.safetensors")
    return Path(cfg.paths.log_dir) / "pca" / f"untrained-{cfg.model.name}-seed{cfg.seed}-{key}.safetensors"


def fit_pca(net: torch.nn.Module, cfg: DictConfig, split: PlaceSplit, save: bool = True) -> tuple[PCAWhitening, str, Path]:
    """PCA-whitening as ``pca_fit`` asks, for evaluating ``split``: (PCA, resolved pca_fit, file).

    Fitted on at most ``pca_max_images`` descriptors and cached (where ``save``: one of
    several processes); 'database' fits on the split's database images only, never on the
    queries being evaluated.
    """
    fit = resolve_pca_fit(cfg)
    in_dim = descriptor_dim(net, cfg)
    if fit not in PCA_FIT_CHOICES:
        return PCAWhitening.load(fit, in_dim=in_dim), fit, Path(fit)
    if fit == "train":
        source = cfg.dataset.pca_source
        fit_split = load_split(source.kind, source.root, source.split, scale=source.scale)
        # Queries and database images alike, as the reference (OpenIBL) fits it.
        candidates = np.arange(fit_split.num_queries + fit_split.num_db)
        name = f"{source.kind}{source.scale or ''}-{source.split}"
    else:
        fit_split = split
        candidates = split.num_queries + np.arange(split.num_db)  # split_images: queries first
        name = f"{cfg.dataset.kind}{cfg.dataset.scale or ''}-{split.split}-database"
    n = min(cfg.pca_max_images, len(candidates))
    out_dim = min(cfg.pca_dim, n - 1, in_dim)
    path = pca_cache_path(cfg, name, fit_split.root, in_dim, out_dim)
    if path.is_file():
        return PCAWhitening.load(path, in_dim=in_dim), fit, path
    chosen = np.sort(np.random.default_rng(cfg.seed).choice(candidates, size=n, replace=False))
    transform = _transform(cfg)
    images = split_images(fit_split, transform, cfg.skip_corrupt)
    extraction = extract_descriptors(
        net, Subset(images, chosen.tolist()), batch_size=cfg.batch_size if transform.image_size else 1,
        num_workers=cfg.num_workers, desc="describe PCA training images",
    )
    pca = PCAWhitening.fit(torch.from_numpy(extraction.descriptors[extraction.valid]).float(), out_dim)
    if save:
        pca.save(path)
    return pca, fit, path


def _thumbnail(path: Path, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((size[1], size[0])))


def save_pictures(
    cfg: DictConfig, out_dir: Path, split: PlaceSplit, result: Retrieval, net: torch.nn.Module,
    teacher: torch.nn.Module | None,
) -> None:
    thumb = (96, 128)
    positives = split.eval_positives()
    examples = pick_examples(result.topk, positives, num=6, seed=cfg.seed)
    plot_retrievals(
        out_dir / "retrievals.png",
        [_thumbnail(split.q_paths[q], thumb) for q in examples],
        [[_thumbnail(split.db_paths[j], thumb) for j in result.topk[q, :5] if j >= 0] for q in examples],
        [[bool(np.isin(j, positives[q])) for j in result.topk[q, :5] if j >= 0] for q in examples],
        titles=[split.q_rel[q] for q in examples],
    )
    plot_recall_curve(out_dir / "recall_at_n.png", {cfg.model.name: result.recall})
    if isinstance(net, PlaceNet):
        transform = _transform(cfg)
        chosen = examples[:4]
        batch = torch.stack([transform(Image.open(split.q_paths[q]).convert("RGB")) for q in chosen])
        with torch.no_grad():
            features = net.encode(batch).features
        h, w = features.shape[-2:]
        maps = {"model": [m.reshape(h, w).numpy() for m in attention_map(features)]}
        if teacher is not None:  # the map it is distilled from (docs/method.md, section 5)
            maps["teacher"] = [m.numpy() for m in teacher_targets_of(teacher, batch)[1]]
        plot_attention(out_dir / "attention.png", [_thumbnail(split.q_paths[q], thumb) for q in chosen], maps)


def load_eval_net(cfg: DictConfig) -> torch.nn.Module:
    """The network to evaluate: a checkpoint (any supported layout) or an exported ONNX model."""
    if cfg.backend == "onnxruntime":
        if not cfg.backend_model:
            raise ValueError("backend=onnxruntime needs backend_model=PATH.onnx (python -m wakd.export ...)")
        return OnnxDescriptorNet(cfg.backend_model)  # PCA, if any, was exported with it
    if cfg.backend != "torch":
        raise ValueError(f"backend={cfg.backend!r}: choose torch or onnxruntime")
    return build_net(model_config_for(cfg, cfg.ckpt), cfg.ckpt)


STORE_CHOICES = ("memory", "disk")
STORE_NAME = "descriptors.npy"


def descriptor_store(cfg: DictConfig, out_dir: Path) -> Path | None:
    """Where ``store`` puts the descriptors: None (``memory``) or ``<out_dir>/descriptors.npy`` (``disk``)."""
    choice = cfg.get("store", "memory")
    if choice not in STORE_CHOICES:
        raise ValueError(f"store={choice!r}: choose memory (descriptors in RAM) or disk (streamed to {STORE_NAME})")
    return out_dir / STORE_NAME if choice == "disk" else None


def run(cfg: DictConfig) -> dict[int, float]:
    """Evaluate as one process, or as all the processes torchrun / SLURM started (on any
    number of nodes): each describes a shard of the images, global rank 0 writes the results."""
    if HydraConfig.initialized():
        check_shared_run_dir(HydraConfig.get())
    with launcher_process_group() as rank:
        return evaluate(cfg, writer=rank == 0)


def evaluate(cfg: DictConfig, writer: bool = True) -> dict[int, float]:
    """Recall@N of ``cfg``'s network; files and the report only where ``writer``."""
    start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = descriptor_store(cfg, out_dir)
    spec = SearchSpec.from_config(cfg.get("search"), seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # an untrained network is reproducible per seed (and the same on every rank)
    split = load_dataset_split(cfg.dataset, cfg.split)
    net = load_eval_net(cfg)
    if isinstance(net, PlaceNet) and cfg.ckpt is None:
        init_netvlad(net, cfg.centroids)  # an untrained NetVLAD: the clustered centroids, when present
    pca_fit, pca_file = None, None
    if cfg.pca and isinstance(net, PlaceNet):
        net.pca, pca_fit, pca_file = fit_pca(net, cfg, split, save=writer)
    elif is_zoo_model(cfg.model) and cfg.model.pca:  # off unless model.pca=true
        pca, pca_fit, pca_file = fit_pca(net, cfg, split, save=writer)
        net = torch.nn.Sequential(net, pca)
    teacher = build_teacher_net(cfg.teacher) if cfg.get("teacher") else None
    dim = getattr(net, "descriptor_dim", None)
    if not spec.exact and dim is not None:
        spec.new_index(dim)  # a bad search.index fails now, not after extraction

    transforms = (_transform(cfg), _transform(cfg, queries=True))
    # Images of their own sizes (a published model at full resolution, Tokyo's resized
    # queries) cannot be stacked into batches: one at a time.
    fixed = all(t.image_size is not None for t in transforms)
    result = evaluate_split(
        net, split, split_images(split, *transforms[:1], cfg.skip_corrupt, query_transform=transforms[1]),
        ns=cfg.ns, batch_size=cfg.batch_size if fixed else 1, num_workers=cfg.num_workers, store=store, spec=spec,
    )
    if not writer:  # every rank holds the same result; one writes it
        return result.recall
    no_positive = int(sum(len(p) == 0 for p in split.eval_positives()))
    write_results(
        out_dir,
        dataset=cfg.dataset.name,
        # Where one dataset has several protocols (MSLS: msls-val vs msls-val-folder), which one.
        protocol=cfg.dataset.get("protocol", cfg.dataset.name),
        split=split.split,
        checkpoint=cfg.ckpt or (cfg.model.weights if is_zoo_model(cfg.model) else None),
        num_queries=split.num_queries,
        num_database=split.num_db,
        descriptor_dim=int(result.q_desc.shape[1]),
        recall=result.recall,
        images_per_second=result.images_per_second,
        seconds_total=time.perf_counter() - start,
        queries_without_positive=no_positive,
        skipped_images=result.num_skipped,
        model=cfg.model.name,
        pos_dist_thr=split.eval_radius,
        pca_fit=pca_fit,
        pca_file=str(pca_file) if pca_file else None,
        descriptor_store=str(store) if store else None,
        search=spec.index,
        card=evaluation_card(cfg, split, net, pca_fit=pca_fit, pca_file=pca_file, spec=spec, input_rule=input_rule(cfg)),
    )
    write_predictions(out_dir, split.q_rel, split.db_rel, result.topk, result.distances)
    if cfg.plots:
        save_pictures(cfg, out_dir, split, result, net, teacher)
    print(recall_table({cfg.model.name: result.recall}))
    if no_positive:
        print(f"{no_positive} queries have no database image within {split.eval_radius:g} m (counted as misses)")
    print(f"results written to {out_dir}")
    return result.recall
