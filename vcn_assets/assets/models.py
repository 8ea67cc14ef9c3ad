"""The face-ID model: the pretrained backbone, its per-movie finetuned copy, and the embeddings they produce."""

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from resources import (
    ArtifactStore,
    BackboneResource,
    ClusteringResource,
    WarehouseResource,
)
from vcn.clustering.cannot_link import on_screen_together
from vcn.identity.embeddings import crop_embeddings_table, track_means
from vcn.pipeline import CropFile, adapt, embed
from vcn_assets import artifacts
from vcn_assets.assets.preprocess import face_tracks, track_crops
from vcn_assets.assets.recording import CODE_VERSION, movie_asset, preview, stage
from vcn_assets.jobs import GPU_POOL

if TYPE_CHECKING:
    from vcn.identity.selfsup.finetune import FinetunedModel

GROUP = "models"


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


def read_tracks(store: ArtifactStore, movie_id: str) -> pl.DataFrame:
    """The movie's tracks sorted by id, with what cannot-link needs: the rows that crops and clusters index."""
    columns = ["track_id", "shot_id", "start_frame", "end_frame"]
    return store.read_parquet(movie_id, artifacts.TRACKS, columns=columns).sort("track_id")


@movie_asset(group=GROUP, deps=[track_crops, face_tracks, base_model], kinds={"torch", "safetensors"}, pool=GPU_POOL)
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
    wh = warehouse.get()
    with stage(context, wh, "finetuned_model") as run:
        movie_id = run.movie_id
        base = backbone.load()
        tracks = read_tracks(store, movie_id)
        source = CropFile.open(store.local(movie_id, artifacts.CROPS), base.template, tracks["track_id"].to_numpy())
        adaptation = adapt(
            base, source, tracks.height, enabled=config.enabled, cannot_link=on_screen_together(tracks),
            seed=config.seed, progress=_epoch_progress(context, run),
        )
        record = {"movie_id": movie_id, "base_version": base.version, "enabled": False, "version": base.version}
        metadata: dict = {"base_model_version": base.version, "crops": source.crops.height}
        model = adaptation.model
        if model is not None:
            checkpoint = artifacts.finetuned_checkpoint(movie_id, model.version)
            with store.writing_model(checkpoint) as tmp:
                model.save(tmp)
            path = store.model_uri(checkpoint)
            record.update(_finetuned_record(model, config.seed), checkpoint=path, model_store_name=checkpoint)
            metadata.update(_finetuned_metadata(model, record, adaptation.seconds))
            for problem in record["collapse_problems"]:
                context.log.warning(f"finetuning may have collapsed: {problem}")
            context.log.info(f"finetuned {base.version} -> {model.version} ({model.mode}) in {adaptation.seconds:.1f} s")
            if model.steps_aside:
                context.log.warning(f"the pretrained model {base.version} embeds movie {movie_id}: {model.steps_aside}")
            run.artifact = path
        else:
            record["reason"] = adaptation.skipped
            context.log.warning(f"no finetuning for movie {movie_id}: {adaptation.skipped}; the pretrained model is used")
            metadata["skipped"] = adaptation.skipped
        with store.writing(movie_id, artifacts.FINETUNED_MODEL) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
        run.items, run.row_count = source.crops.height, None
        run.details = {k: record[k] for k in ("base_version", "version", "enabled")}
        run.details.update({k: record.get(k) for k in ("mode", "finetune_crops", "stepped_aside", "reason")})
    return run.result(metadata, data_version=record["version"])


def _epoch_progress(context: dg.AssetExecutionContext, run) -> Callable[[int, int, int, float], None]:
    """The finetuning's ``progress(round, epoch, epochs, loss)``: each epoch's loss in the run log, and a meter
    of epochs per round."""
    meters = {}

    def report(round_: int, epoch: int, epochs: int, loss: float) -> None:
        context.log.info(f"round {round_}, epoch {epoch + 1}/{epochs}: loss {loss:.4f}")
        if round_ not in meters:
            meters[round_] = run.meter(f"round {round_} epochs", "epochs")
        meters[round_](epoch + 1, epochs)
        if epoch + 1 == epochs:
            meters[round_].close()

    return report


def _finetuned_record(model: "FinetunedModel", seed: int) -> dict:
    """What ``finetuned_model.json`` keeps of a finetuned model, besides where its checkpoint is."""
    return {
        "enabled": True,
        "version": model.version,
        "stepped_aside": model.steps_aside,
        "check": model.check.to_dict() if model.check else None,
        "mode": model.mode,
        "collapse": model.collapse.to_dict() if model.collapse else None,
        "collapse_problems": model.collapse.problems() if model.collapse else [],
        "seed": seed,
        "finetune_crops": model.history.crops,
        "max_finetune_crops": model.settings["max_crops"],
    }


def _finetuned_metadata(model: "FinetunedModel", record: dict, seconds: float) -> dict:
    """The asset metadata of a finetuning run: settings, loss curve, throughput, collapse."""
    history = model.history
    curve = history.loss_curve
    return {
        "finetuned_version": model.version,
        "compute_mode": model.mode,
        "finetune_crops": record["finetune_crops"],
        "max_finetune_crops": record["max_finetune_crops"],
        "settings": dg.MetadataValue.json(model.settings),
        "loss_curve": dg.MetadataValue.json([round(v, 4) for v in curve]),
        "final_loss": round(curve[-1], 4) if curve else None,
        "rounds": len(history.rounds),
        "rounds_stopped": history.stopped,
        "matched_track_pairs": history.n_matches,
        "pairs_per_second": round(history.pairs_per_second, 1),
        "bank_seconds": round(history.bank_seconds, 1),
        "finetune_seconds": round(seconds, 1),
        "collapse": dg.MetadataValue.json(record["collapse"]),
        "adaptation_check": dg.MetadataValue.json(record["check"]),
        "embeds_movie": "pretrained" if record["stepped_aside"] else "finetuned",
        "stepped_aside": record["stepped_aside"],
        "checkpoint": dg.MetadataValue.path(str(record["checkpoint"])),
    }


def movie_model(backbone: BackboneResource, store: ArtifactStore, movie_id: str, *, loss: bool = False):
    """The model that embeds a movie's crops: its finetuned backbone when there is one and its check kept it
    (``finetuned_model.json``'s ``stepped_aside`` is empty), else the pretrained one.

    Args:
        loss: The movie is clustered by the finetuned loss metric, which only the finetuned model
            gives: it embeds whatever the check found.

    Returns:
        (backbone, finetuned model or None).
    """
    from vcn.identity.selfsup.finetune import load_finetuned

    base = backbone.load()
    record = store.read_json(movie_id, artifacts.FINETUNED_MODEL)
    if not record or not record.get("enabled") or (record.get("stepped_aside") and not loss):
        return base, None
    name = record.get("model_store_name")
    finetuned = load_finetuned(store.local_model(name) if name else record["checkpoint"], base)
    return finetuned.backbone, finetuned


@movie_asset(
    group=GROUP, deps=[track_crops, face_tracks, finetuned_model], kinds={"torch", "parquet", "duckdb"}, pool=GPU_POOL
)
def track_embeddings(
    context: dg.AssetExecutionContext,
    backbone: BackboneResource,
    clustering: ClusteringResource,
    store: ArtifactStore,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    """Embeddings and SER-FIQ quality of every kept crop (Parquet + .npy), and per-track means, with the model version on every row.

    When the movie is clustered by the loss metric, the same pass also keeps the
    head logits of a bounded sample of the crops (``loss_sample.npz``), so that
    ``face_clusters`` needs neither the model nor the chips again.
    """
    wh = warehouse.get()
    with stage(context, wh, "track_embeddings") as run:
        model, finetuned = movie_model(backbone, store, run.movie_id, loss=clustering.similarity == "loss")
        base_version = finetuned.base_version if finetuned else model.version
        registered = store.read_model_json(artifacts.BASE_MODEL)
        if registered and registered["version"] != base_version:
            context.log.warning(
                f"backbone version {base_version} differs from the registered base model {registered['version']}; "
                "re-materialise base_model to record it"
            )
        track_ids = read_tracks(store, run.movie_id)["track_id"].to_numpy()
        source = CropFile.open(store.local(run.movie_id, artifacts.CROPS), model.template, track_ids)
        embedded = embed(
            model, source, loss_metric=finetuned if clustering.similarity == "loss" else None,
            batch_size=backbone.batch_size, progress=run.meter("crops embedded", "crops"),
        )
        crops = crop_embeddings_table(source.crops, model.version, embedded.quality)
        tracks = track_means(crops, embedded.embeddings, model.version)
        with store.writing(run.movie_id, artifacts.CROP_EMBEDDING_MATRIX) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, embedded.embeddings)
        store.write_parquet(run.movie_id, artifacts.CROP_EMBEDDINGS, crops)
        if embedded.loss is not None:
            with store.writing(run.movie_id, artifacts.LOSS_SAMPLE) as tmp:
                embedded.loss.save(tmp)
        path = store.write_parquet(run.movie_id, artifacts.TRACK_EMBEDDINGS, tracks)
        wh.replace_movie_rows("track_embeddings", run.movie_id, tracks)
        with_quality = embedded.quality is not None
        run.items, run.row_count, run.artifact = crops.height, tracks.height, str(path)
        run.details = {
            "model_version": model.version, "base_version": base_version, "finetuned": finetuned is not None,
            "device": model.device, "dtype": model.dtype, "quality": with_quality,
        }
    return run.result(
        {
            "crops_embedded": crops.height,
            "tracks": tracks.height,
            "model": model.name,
            "model_version": model.version,
            "finetuned": finetuned is not None,
            "device": model.device,
            "dtype": model.dtype,
            "crop_quality": "SER-FIQ" if with_quality else "unsupported by the backbone",
            "mean_crop_quality": float(crops["quality"].mean()) if with_quality and crops.height else None,
            "loss_metric_crops": None if embedded.loss is None else len(embedded.loss.rows),
            "crops_per_s": round(crops.height / run.seconds, 1) if run.seconds else 0.0,
            "preview": preview(tracks.drop("embedding")),
        }
    )


model_assets = [base_model, finetuned_model, track_embeddings]
