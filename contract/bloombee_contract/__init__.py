"""What the control plane and the data plane agree on, importing neither.

* ``paths``       URL paths every server answers and every client calls;
* ``errors``      error codes, each with its one HTTP status, and OpenAI's error shape;
* ``codec_cost``  when compression pays: the rule stages apply per frame and the planner per hop;
* ``status``      phases, condition types and reasons of a DistributedLLM (the CRD's enums);
* ``launch``      typed launch specs of the stage server, the gateway and the probe: one
                  definition per flag renders the command line and builds the server's parser;
* ``model_source`` what a model source string names, and where its files are.

Pure Python and the standard library only: the operator image has no torch and no aiohttp.
"""
