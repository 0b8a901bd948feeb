"""The experiment layer: from a configuration to a run, its outputs and its command line.

One folder holds the whole assembly (the library never imports it):

=================  ==========================================================
``config``         the sectioned configuration (frozen dataclasses), TOML, flat keys
``schema``         one declaration per field: type, range, help, flag
``registry``       families of builders: name -> builder + metadata + rules
``data``           data sources (registry) and the cached experiment data
``models``         models (registry)
``sampling``       samplers (registry)
``algorithms``     algorithms (registry): client + server programs
``server``         aggregators (registry), the server chain, the privacy plan
``attacks``        poisoning attacks (registry): the adversary of a run
``assemble``       every builder, once, in order: the :class:`Experiment`
``reporters``      what the host loop does with each round
``runner``         the host loop: ``run_experiment``
``cli``            ``fedjax-sim run``; ``privacy_cli``, ``attack_cli``
=================  ==========================================================
"""
