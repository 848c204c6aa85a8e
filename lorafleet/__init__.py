"""lorafleet: serve LoRA-fine-tuned small specialists to many tenants, and price them against a generalist."""

__version__ = "0.1.0"
