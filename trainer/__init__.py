"""Stage 2: fine-tune CLIP with projection heads under DeepSpeed ZeRO on data_prep's shards."""
