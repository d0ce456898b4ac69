# Example pillar for the portfwd state: DNAT with masquerade to a backend on another host.
portfwd:
  params:
    forwards:
      - name: web
        listen_port: 4321
        to: "172.100.102.101:1234"
