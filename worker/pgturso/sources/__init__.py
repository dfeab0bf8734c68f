"""Where batches come from: the outbox (trigger capture) or a logical slot (wal capture)."""
