"""The VMM <-> daemon control protocol (docs/protocol.md): message codecs and framing.

Pure code: no asyncio, no sockets. The session and the socket adapter build on it.
"""
