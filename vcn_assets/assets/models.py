"""The face-ID model: the pretrained backbone and the per-movie embeddings it produces."""

import dagster as dg
import numpy as np

from resources import ArtifactStore, BackboneResource, WarehouseResource
from vcn.embeddings import embed_crops, track_means
from vcn.quality import supports_quality
from vcn_assets.assets.preprocess import track_crops
from vcn_assets.assets.recording import CODE_VERSION, preview, stage
from vcn_assets.partitions import movies

BASE_MODEL_FILE = "base_model.json"


@dg.asset(group_name="models", code_version=CODE_VERSION, kinds={"torch", "duckdb"})
def base_model(
    context: dg.AssetExecutionContext, backbone: BackboneResource, store: ArtifactStore, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """The pretrained face-ID backbone: its name and content-derived version, recorded in the model registry."""
    model = backbone.load()
    record = {
        "name": model.name,
        "version": model.version,
        "checkpoint": backbone.checkpoint,
        "dim": model.dim,
        "input_size": model.input_size,
        "template": model.template,
    }
    path = store.write_model_json(BASE_MODEL_FILE, record)
    warehouse.get().record_model(**record)
    context.log.info(f"base model {model.name} version {model.version} on {model.device}")
    return dg.MaterializeResult(
        metadata={**{k: v if v is not None else "" for k, v in record.items()}, "device": model.device, "path": dg.MetadataValue.path(str(path))},
        data_version=dg.DataVersion(model.version),
    )


@dg.asset(
    partitions_def=movies,
    group_name="models",
    code_version=CODE_VERSION,
    deps=[track_crops, base_model],
    kinds={"torch", "parquet", "duckdb"},
)
def track_embeddings(
    context: dg.AssetExecutionContext, backbone: BackboneResource, store: ArtifactStore, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """Embeddings and SER-FIQ quality of every kept crop (Parquet + .npy), and per-track means, with the model version on every row."""
    wh = warehouse.get()
    with stage(context, wh, "track_embeddings") as run:
        model = backbone.load()
        registered = store.read_model_json(BASE_MODEL_FILE)
        if registered and registered["version"] != model.version:
            context.log.warning(
                f"backbone version {model.version} differs from the registered base model {registered['version']}; "
                "re-materialise base_model to record it"
            )
        with_quality = supports_quality(model)
        if not with_quality:
            context.log.warning(f"backbone {model.name} cannot score crop quality; no track will be left out for quality")
        crops, matrix = embed_crops(
            store.path(run.movie_id, "track_crops.parquet"), model, backbone.batch_size, quality=with_quality
        )
        tracks = track_means(crops, matrix, model.version)
        with store.writing(run.movie_id, "crop_embeddings.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, matrix)
        store.write_parquet(run.movie_id, "crop_embeddings.parquet", crops)
        path = store.write_parquet(run.movie_id, "track_embeddings.parquet", tracks)
        wh.replace_movie_rows("track_embeddings", run.movie_id, tracks)
        run.items, run.row_count, run.artifact = crops.height, tracks.height, str(path)
        run.details = {"model_version": model.version, "device": model.device, "dtype": model.dtype, "quality": with_quality}
    return dg.MaterializeResult(
        metadata={
            "crops_embedded": crops.height,
            "tracks": tracks.height,
            "model": model.name,
            "model_version": model.version,
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


model_assets = [base_model, track_embeddings]
