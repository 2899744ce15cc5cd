"""Virtio devices served by dvs: the virtqueue reference model, the vhost-user block server.

The device models themselves are C (csrc/virtio/, wrapped by ``dvs.lowlevel.virtio``); this
package holds the policy around them: the spec-literal reference and mock driver used to
test them (``reference``), the vhost-user block server (``server``) and its CLI (``cli``).
"""
