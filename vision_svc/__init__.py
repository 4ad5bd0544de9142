"""The vision stage: images in, InternVL image embeddings out, over gRPC.

It owns its devices and nothing of the language model: it reads only the vision tensors of a checkpoint,
tiles images as the original InternVL preprocessing does, batches tiles of concurrent requests through one
encoder, caches embeddings by image content, and streams each image's embeddings as soon as they are ready.
"""
