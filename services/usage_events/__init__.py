"""Usage events: shared infrastructure every feature records into (the append-only `events`
table and its batching recorder); analytics reads them."""
