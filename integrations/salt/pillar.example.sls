# Example pillar for the portfwd state (seed 000 #1).
portfwd:
  params:
    forwards:
      - name: web
        listen_port: 4321
        to: "172.100.102.101:1234"
