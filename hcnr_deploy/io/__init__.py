"""Model I/O: lazy safetensors reads, base / fine-tune access, atomic sharded writes (DESIGN.md section 7).

Nothing here holds a whole checkpoint: tensors are read one at a time (plain reads, no mmap) and
written shard by shard. One module per job (imported by name; this package imports nothing itself):

- tensorfile.py   one safetensors file read tensor by tensor; the finite check
- checkpoint.py   a HF model folder (Checkpoint), hub ids, which tensors are decoder Linears
- finetune.py     the fine-tune: a full folder or a PEFT LoRA adapter (``D = s B A``, never a dense model copy)
- load.py         the transformers model and tokenizer for the calibration passes
- shards.py       shard-by-shard writing and the side files (config, tokenizer) copied beside it
- atomic.py       AtomicDir (temporary folder + rename) and JSON writing
"""
