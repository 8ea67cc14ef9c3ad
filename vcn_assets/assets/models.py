"""The face-ID model: the pretrained backbone, its per-movie finetuned copy, and the embeddings they produce."""

import json
import time

import dagster as dg
import numpy as np
from pydantic import Field

from resources import ArtifactStore, BackboneResource, WarehouseResource
from vcn.clustering.cannot_link import on_screen_together
from vcn.identity.embeddings import (
    embed_crops,
    read_kept_chips,
    read_kept_crops,
    track_means,
)
from vcn.identity.quality import supports_quality
from vcn_assets import artifacts
from vcn_assets.assets.preprocess import face_tracks, track_crops
from vcn_assets.assets.recording import CODE_VERSION, preview, stage
from vcn_assets.jobs import GPU_POOL
from vcn_assets.partitions import movies


@dg.asset(group_name="models", code_version=CODE_VERSION, kinds={"torch", "duckdb"})
def base_model(
    context: dg.AssetExecutionContext, backbone: BackboneResource, store: ArtifactStore, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """The pretrained face-ID backbone: its name and content-derived version, recorded in the model registry."""
    model = backbone.load()
    record = {
        "name": model.name,
        "version": model.version,
        "checkpoint": backbone.choice()[1],
        "dim": model.dim,
        "input_size": model.input_size,
        "template": model.template,
    }
    path = store.write_model_json(artifacts.BASE_MODEL, record)
    warehouse.get().record_model(**record)
    context.log.info(f"base model {model.name} version {model.version} on {model.device}")
    return dg.MaterializeResult(
        metadata={**{k: v if v is not None else "" for k, v in record.items()}, "device": model.device, "path": dg.MetadataValue.path(str(path))},
        data_version=dg.DataVersion(model.version),
    )


class FinetuneConfig(dg.Config):
    enabled: bool = Field(
        default=True,
        description="Adapt the backbone to the movie by self-distillation (the method). Off: the movie's embeddings "
        "and clusters come from the pretrained model.",
    )
    seed: int = Field(default=0, description="Seed of the finetuning; the same seed gives the same model on a CPU.")


@dg.asset(
    partitions_def=movies,
    group_name="models",
    code_version=CODE_VERSION,
    deps=[track_crops, face_tracks, base_model],
    kinds={"torch", "safetensors"},
    pool=GPU_POOL,
)
def finetuned_model(
    context: dg.AssetExecutionContext,
    config: FinetuneConfig,
    backbone: BackboneResource,
    store: ArtifactStore,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    """The backbone adapted to this movie (self-distillation in progressive rounds), as a checkpoint in the model store.

    The compute mode is chosen from the device (CUDA: the whole backbone in bf16;
    CPU: a budget that trains the last stage on banked views) and recorded with
    the settings, the loss curve and the collapse diagnostics.
    """
    from vcn.identity.selfsup.finetune import compute_mode, finetune_movie
    from vcn.identity.selfsup.sampling import spread_crops

    wh = warehouse.get()
    with stage(context, wh, "finetuned_model") as run:
        movie_id = run.movie_id
        base = backbone.load()
        record = {"movie_id": movie_id, "base_version": base.version, "enabled": False, "version": base.version}
        reason = None
        if not config.enabled:
            reason = "finetuning is turned off in the asset's config"
        elif base.module is None:
            reason = f"backbone {base.name} has no torch module to finetune (ONNX models only run)"
        crops_path = store.local(movie_id, artifacts.CROPS)
        crops = read_kept_crops(crops_path, base.template)
        if reason is None and crops.height == 0:
            reason = "the movie has no kept crops"
        metadata: dict = {"base_model_version": base.version, "crops": crops.height}
        if reason is None:
            tracks = store.read_parquet(
                movie_id, artifacts.TRACKS, columns=["track_id", "shot_id", "start_frame", "end_frame"]
            ).sort("track_id")
            track_ids = tracks["track_id"].to_numpy()
            crop_track = np.searchsorted(track_ids, crops["track_id"].to_numpy())
            # Memory stays bounded: only the crops finetuning uses (at most max_crops) are decoded.
            mode = compute_mode(base.device, crops.height, config.seed)
            rows = spread_crops(crop_track, mode.config.max_crops)
            _, chips = read_kept_chips(crops_path, base.template, rows)
            started = time.perf_counter()
            model = finetune_movie(
                base, chips, crop_track[rows], len(track_ids), cannot_link=on_screen_together(tracks), seed=config.seed,
                mode=mode, progress=lambda r, e, n, loss: context.log.info(f"round {r}, epoch {e + 1}/{n}: loss {loss:.4f}"),
            )
            del chips
            seconds = time.perf_counter() - started
            checkpoint = artifacts.finetuned_checkpoint(movie_id, model.version)
            with store.writing_model(checkpoint) as tmp:
                model.save(tmp)
            path = store.model_uri(checkpoint)
            curve = [loss for r in model.history["rounds"] for loss in r["loss_curve"]]
            problems = model.collapse.problems() if model.collapse else []
            record.update(
                enabled=True, version=model.version, checkpoint=path, model_store_name=checkpoint, mode=model.mode,
                collapse=model.collapse.to_dict() if model.collapse else None, collapse_problems=problems,
                seed=config.seed, finetune_crops=model.history["crops"], max_finetune_crops=mode.config.max_crops,
            )
            for problem in problems:
                context.log.warning(f"finetuning may have collapsed: {problem}")
            context.log.info(f"finetuned {base.version} -> {model.version} ({model.mode}) in {seconds:.1f} s")
            metadata.update(
                {
                    "finetuned_version": model.version,
                    "compute_mode": model.mode,
                    "finetune_crops": record["finetune_crops"],
                    "max_finetune_crops": record["max_finetune_crops"],
                    "settings": dg.MetadataValue.json(model.settings),
                    "loss_curve": dg.MetadataValue.json([round(v, 4) for v in curve]),
                    "final_loss": round(curve[-1], 4) if curve else None,
                    "rounds": len(model.history["rounds"]),
                    "rounds_stopped": model.history["stopped"],
                    "matched_track_pairs": model.history["n_matches"],
                    "pairs_per_second": round(model.history["pairs_per_second"], 1),
                    "bank_seconds": round(model.history["bank_seconds"], 1),
                    "finetune_seconds": round(seconds, 1),
                    "collapse": dg.MetadataValue.json(record["collapse"]),
                    "checkpoint": dg.MetadataValue.path(str(path)),
                }
            )
        else:
            record["reason"] = reason
            context.log.warning(f"no finetuning for movie {movie_id}: {reason}; the pretrained model is used")
            metadata["skipped"] = reason
        with store.writing(movie_id, artifacts.FINETUNED_MODEL) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
        run.items, run.row_count = crops.height, None
        run.artifact = record.get("checkpoint")
        run.details = {k: record[k] for k in ("base_version", "version", "enabled") if k in record}
        run.details.update({k: record.get(k) for k in ("mode", "finetune_crops")})
    metadata["seconds"] = run.details["seconds"]
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(record["version"]))


def movie_model(backbone: BackboneResource, store: ArtifactStore, movie_id: str):
    """The model that embeds a movie's crops: its finetuned backbone when there is one, else the pretrained one.

    Returns:
        (backbone, finetuned model or None).
    """
    from vcn.identity.selfsup.finetune import load_finetuned

    base = backbone.load()
    record = store.read_json(movie_id, artifacts.FINETUNED_MODEL)
    if not record or not record.get("enabled"):
        return base, None
    name = record.get("model_store_name")
    finetuned = load_finetuned(store.local_model(name) if name else record["checkpoint"], base)
    return finetuned.backbone, finetuned


@dg.asset(
    partitions_def=movies,
    group_name="models",
    code_version=CODE_VERSION,
    deps=[track_crops, finetuned_model],
    kinds={"torch", "parquet", "duckdb"},
    pool=GPU_POOL,
)
def track_embeddings(
    context: dg.AssetExecutionContext, backbone: BackboneResource, store: ArtifactStore, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """Embeddings and SER-FIQ quality of every kept crop (Parquet + .npy), and per-track means, with the model version on every row."""
    wh = warehouse.get()
    with stage(context, wh, "track_embeddings") as run:
        model, finetuned = movie_model(backbone, store, run.movie_id)
        registered = store.read_model_json(artifacts.BASE_MODEL)
        base_version = finetuned.base_version if finetuned else model.version
        if registered and registered["version"] != base_version:
            context.log.warning(
                f"backbone version {base_version} differs from the registered base model {registered['version']}; "
                "re-materialise base_model to record it"
            )
        with_quality = supports_quality(model)
        if not with_quality:
            context.log.warning(f"backbone {model.name} cannot score crop quality; no track will be left out for quality")
        crops, matrix = embed_crops(
            store.local(run.movie_id, artifacts.CROPS), model, backbone.batch_size, quality=with_quality
        )
        tracks = track_means(crops, matrix, model.version)
        with store.writing(run.movie_id, artifacts.CROP_EMBEDDING_MATRIX) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, matrix)
        store.write_parquet(run.movie_id, artifacts.CROP_EMBEDDINGS, crops)
        path = store.write_parquet(run.movie_id, artifacts.TRACK_EMBEDDINGS, tracks)
        wh.replace_movie_rows("track_embeddings", run.movie_id, tracks)
        run.items, run.row_count, run.artifact = crops.height, tracks.height, str(path)
        run.details = {
            "model_version": model.version, "base_version": base_version, "finetuned": finetuned is not None,
            "device": model.device, "dtype": model.dtype, "quality": with_quality,
        }
    return dg.MaterializeResult(
        metadata={
            "crops_embedded": crops.height,
            "tracks": tracks.height,
            "model": model.name,
            "model_version": model.version,
            "finetuned": finetuned is not None,
            "device": model.device,
            "dtype": model.dtype,
            "crop_quality": "SER-FIQ" if with_quality else "unsupported by the backbone",
            "mean_crop_quality": float(crops["quality"].mean()) if with_quality and crops.height else None,
            "crops_per_s": round(crops.height / run.details["seconds"], 1) if run.details["seconds"] else 0.0,
            "seconds": run.details["seconds"],
            "path": dg.MetadataValue.path(str(path)),
            "preview": preview(tracks.drop("embedding")),
        }
    )


model_assets = [base_model, finetuned_model, track_embeddings]
