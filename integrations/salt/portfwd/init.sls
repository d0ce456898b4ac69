# Salt state: converge portfwd to the params in pillar `portfwd:params`, with Salt's stateful
# cmd.run contract. The params go to portfwd on stdin as JSON; portfwd prints one JSON object
# on one line with "changed" (and "msg"), which is exactly what `stateful` reads from the last
# line, and a failed run exits 1 and fails the state. In test mode (test=True) the `test_name`
# command runs `portfwd apply --check --diff` instead, which touches nothing.
portfwd-apply:
  cmd.run:
    - name: portfwd apply
    - stdin: {{ salt['pillar.get']('portfwd:params', {}) | json | yaml_dquote }}
    - stateful:
      - test_name: portfwd apply --check --diff
