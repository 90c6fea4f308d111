"""Timer events: the event model, subscription routing, delivery, and a client for flow engines."""
