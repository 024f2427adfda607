"""Parallelism every backend's plan shares: process groups and mesh dimension names
(``distributed``), KV-head replication when the TP degree exceeds the KV heads
(``kv_replication``), and parameters held as this rank's shard (``local_shards``). The plans
themselves belong to the backends."""
