"""The service: an HTTP job API, a web page, a job store, workers (embedded or over Redis).

Needs the ``service`` extra (``pip install 'talkgen[service]'``). Entry points: ``talkgen serve``
and ``talkgen worker`` (see docs/service.md), or :func:`talkgen.service.api.create_app`.
"""
