"""Domain services: the ledger's rules, webhook ingest, orders. No Flask here."""
