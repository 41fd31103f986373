"""a1111-proxy: an asynchronous, durable front door for the AUTOMATIC1111 API."""

__version__ = "0.1.0"
