# Salt state: converge portfwd to the params in pillar `portfwd:params` with the native state
# module (_states/portfwd.py, which calls _modules/portfwd.py): test=True is portfwd's check
# mode, `changes` is the diff keyed by entry names, `comment` is portfwd's msg.
portfwd-apply:
  portfwd.managed:
    - params: {{ salt['pillar.get']('portfwd:params', {}) | json }}
