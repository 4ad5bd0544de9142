"""Prometheus metrics of the vision stage (served on --metrics-port)."""

from prometheus_client import Counter, Gauge, Histogram

from protos.work_limits import WorkLimit

REQUESTS = Counter("vision_requests", "Encode requests by final status code", ["code"])
IMAGES = Counter("vision_images", "Images served, by source of the embeddings", ["source"])
TILES = Counter("vision_tiles_encoded", "Tiles run through the encoder")
BATCH_TILES = Histogram("vision_batch_tiles", "Tiles per encoder forward pass",
                        buckets=(1, 2, 4, 8, 13, 16, 26, 32, 48, 64, 128))
FORWARD_SECONDS = Histogram("vision_forward_seconds", "Duration of one encoder forward pass")
STALLED_SECONDS = Gauge("vision_stalled_seconds", "How long work has been in hand with none of it finishing, by part "
                        "(preprocessing, encoder); 0 when idle. Past --stall-timeout-s health turns NOT_SERVING",
                        ["part"])
QUEUE_TILES = Gauge("vision_queue_tiles", "Tiles waiting for the encoder")
PENDING_IMAGES = Gauge("vision_pending_images", "Images being preprocessed or encoded")
ADMITTED_REQUESTS = Gauge("vision_admitted_requests", "Encode requests holding a slot of --max-requests-in-flight")
HELD_BYTES = Gauge("vision_held_bytes", "Bytes of Encode requests being served, counted against --max-bytes-in-flight")
CACHE_HITS = Counter("vision_cache_hits", "Images served from the embedding cache")
CACHE_MISSES = Counter("vision_cache_misses", "Images not in the embedding cache")
CACHE_BYTES = Gauge("vision_cache_bytes", "Bytes held by the embedding cache")
BYTES_STREAMED = Counter("vision_bytes_streamed", "Embedding bytes sent to callers")
DECODED = Counter("vision_images_decoded", "Images decoded, by where: host (Pillow) or device (decode_jpeg)", ["on"])
PREPROCESS_SECONDS = Histogram("vision_preprocess_seconds", "Decode and tiling time per image")
REQUEST_SECONDS = Histogram("vision_request_seconds", "Encode request duration, first byte to last chunk",
                            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))


def watch_work_limit(limit: WorkLimit) -> None:
    """The gauges read `limit` whenever they are scraped, so they never drift from it."""
    ADMITTED_REQUESTS.set_function(lambda: limit.requests)
    HELD_BYTES.set_function(lambda: limit.bytes)
