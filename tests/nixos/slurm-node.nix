# The machine as a one-node Slurm cluster (nixos/modules/services/computing/slurm/slurm.nix, as
# nixos/tests/slurm.nix sets one up: the munge key from tmpfiles, State=UNKNOWN nodes), its GPU a
# gres, and nvidia-kmod-swap's Slurm gate on.
{ pkgs, ... }:
{
  services.slurm = {
    server.enable = true;
    client.enable = true;
    controlMachine = "machine";
    nodeName = [ "machine CPUs=1 Gres=gpu:1 State=UNKNOWN" ];
    partitionName = [ "gpu Nodes=machine Default=YES MaxTime=INFINITE State=UP" ];
    extraConfig = ''
      GresTypes=gpu
    '';
    extraConfigPaths = [
      (pkgs.writeTextDir "gres.conf" ''
        NodeName=machine Name=gpu File=/dev/nvidia0
      '')
    ];
  };
  systemd.tmpfiles.rules = [
    "f /etc/munge/munge.key 0400 munge munge - mungeverryweakkeybuteasytointegratoinatest"
  ];
  services.nvidiaKmodSwap.slurm = {
    enable = true;
    settleTime = 1;
  };
}
