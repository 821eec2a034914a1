"""The GPT-NeoX model: building, checkpoints and hub download, where a head lives in the fused weights, chunked vocabulary losses."""
