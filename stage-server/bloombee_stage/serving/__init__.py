"""Running a server process: bind, announce, stop; metrics; the routes every process serves
(health, readiness, metrics, codecs, link probes).
"""
