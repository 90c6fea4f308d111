"""The application: the daemon's composition root, the socket server, the wire protocol, request
handling, the fire loop, maintenance, configuration and the ``program-timer`` command."""
