"""What the stages share, so that none imports another's internals (plumbing → core → stages):

- `manifest`: the shard manifest data_prep writes, read and checked (format version, sizes, sha256);
- `shards`: a manifest's shards as ranges of samples, read with webdataset's tar reader, decoded;
- `preprocess`: CLIP's image preprocessing and the collate that batches images and captions;
- `clip`: loading a CLIP (hub id, folder or trainer export) and the one embedder every stage uses;
- `presets`: the offline default models (tiny CLIP, tiny VAE and U-Net) and real-size shapes;
- `records`: the resumable parts → merged-manifest writer of bulk jobs (sampler, retrieval);
- `sheets`: contact sheets.
"""
