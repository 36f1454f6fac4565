"""The decode loop (AR and MTP), exact sampling and cache rollback."""
