"""Models and their parts: loading by name, path or GGUF file (`load`, `convert`), LoRA adapters (`lora`), the
teacher's output head kept beside a cache (`head`), and layer pruning for a student initialisation (`prune`)."""
