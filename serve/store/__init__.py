"""The state store (store.py): tenants, adapter versions and aliases, files, fine-tuning jobs, the usage ledger."""

from serve.store.store import Store, StoreError

__all__ = ["Store", "StoreError"]
