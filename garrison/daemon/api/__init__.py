"""Route handlers, one module per resource; each exports a ROUTES table."""
